// generate.mjs — greedy text generation with llama.cpp (node-llama-cpp's prebuilt CPU build)
// from a GGUF file, the way lathe's `%generate PROMPT temperature=0` does it: <bos> + the
// prompt's tokens (llama.cpp's own tokenizer, from the file's vocabulary), then argmax until
// an end-of-generation token or N tokens. Prints the continuation's text only.
//
//   node generate.mjs MODEL.gguf "PROMPT" [N]
//   node generate.mjs MODEL.gguf --chat "MESSAGE" [N]
//
// --chat wraps MESSAGE in Gemma 3's chat turns (as `%%chat` renders one user turn), and the
// answer stops at <end_of_turn> like lathe's.
//
// Used by notebooks/export.ipynb (through %shell) to show llama.cpp's answer next to lathe's.
// Needs `npm ci` in this folder; never downloads or builds anything.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

async function main() {
  const args = process.argv.slice(2);
  const chat = args[1] === "--chat";
  if (chat) args.splice(1, 1);
  const [modelPath, text, nText] = args;
  if (!modelPath || text === undefined) {
    console.error('usage: node generate.mjs MODEL.gguf [--chat] "PROMPT" [N]');
    process.exit(2);
  }
  const prompt = chat ? `<start_of_turn>user\n${text}<end_of_turn>\n<start_of_turn>model\n` : text;
  const n = Number(nText ?? 16);
  const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
  const model = await llama.loadModel({modelPath, gpuLayers: 0});
  // special tokens in the prompt text (<start_of_turn>, ...) are read as such, as lathe does
  const ids = [model.tokens.bos, ...model.tokenize(prompt, true)];
  const context = await model.createContext({contextSize: Math.max(64, ids.length + n + 8), threads: 2});
  const seq = context.getSequence();
  const out = [];
  for await (const tok of seq.evaluate(ids, {temperature: 0})) {
    if (model.isEogToken(tok)) break;
    out.push(tok);
    if (out.length >= n) break;
  }
  process.stdout.write(model.detokenize(out) + "\n");
  await context.dispose();
  await model.dispose();
}

main().catch((e) => {
  console.error(`llama.cpp: ${e?.message ?? e}`);
  process.exit(1);
});
