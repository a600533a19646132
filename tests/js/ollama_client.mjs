// Drive exoproxy with the official ollama-js client through a cold start, and print
// what the client saw as one JSON object. Usage: node ollama_client.mjs BASE_URL MODEL
import { Ollama } from "ollama";

const [baseUrl, model] = process.argv.slice(2);
const client = new Ollama({ host: baseUrl });
const result = {};

try {
  await client.generate({ model, prompt: "hi" });
  result.cold = { ok: true };
} catch (error) {
  result.cold = { name: error.name, status: error.status_code, error: error.error };
}

for (let attempt = 0; attempt < 600; attempt += 1) {
  const status = await (await fetch(`${baseUrl}/status`)).json();
  if (status.provisioning_status === "ready") break;
  await new Promise((resolve) => setTimeout(resolve, 50));
}

const parts = [];
for await (const part of await client.generate({ model, prompt: "hi", stream: true })) {
  parts.push(part.response);
}
result.streamedParts = parts.length;

const chat = await client.chat({
  model,
  messages: [{ role: "user", content: "hello" }],
  stream: false,
});
result.chatContent = chat.message.content;

const listed = await client.list();
result.models = listed.models.map((entry) => entry.name);

console.log(JSON.stringify(result));
