"""
The twistd plugin for exoproxy.

Twisted imports every file in this folder while it discovers plugins, so this file
only names the service, and `twisted.application.service.ServiceMaker` imports
`exoproxy.tap` when twistd runs it.
"""

from twisted.application.service import ServiceMaker

exoproxy = ServiceMaker(
    "exoproxy",
    "exoproxy.tap",
    "An Ollama-compatible proxy to an on-demand Exoscale GPU instance.",
    "exoproxy",
)
