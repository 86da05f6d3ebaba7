// llama.mjs — load a GGUF file in llama.cpp (node-llama-cpp's prebuilt CPU build) and report
// what it computes, as one JSON line on stdout:
//
//   node llama.mjs MODEL.gguf [--prompt 2,17,...] [--n 8] [--eval 2,17,...]
//
// --prompt: token ids fed as-is (no BOS added, no tokenizer: ids avoid tokenizer differences);
//           prints "greedy": the next --n ids by argmax (temperature 0).
// --eval:   token ids; prints "logp" (log-probability of each ids[t+1] given ids[..t], natural
//           log), "nll" (their negated mean), "ppl" = exp(nll) and "n" = number of predictions.
// Also prints "arch" and "file_type" from the GGUF header,
// and "tensor_types" (count of tensors per ggml type) so tests can check what was loaded.
// Never downloads or builds anything (build: "never"); exits 1 with {"error": ...} when
// llama.cpp refuses the file.
import {getLlama, readGgufFileInfo, LlamaLogLevel} from "node-llama-cpp";

function parseArgs(argv) {
  const a = {model: null, prompt: null, n: 8, evalIds: null};
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const ids = (s) => s.split(",").filter((x) => x !== "").map((x) => {
      const v = Number(x);
      if (!Number.isInteger(v) || v < 0) throw new Error(`bad token id '${x}' in ${k}`);
      return v;
    });
    if (k === "--prompt") a.prompt = ids(argv[++i]);
    else if (k === "--eval") a.evalIds = ids(argv[++i]);
    else if (k === "--n") a.n = Number(argv[++i]);
    else if (!a.model) a.model = k;
    else throw new Error(`unexpected argument '${k}'`);
  }
  if (!a.model) throw new Error("usage: node llama.mjs MODEL.gguf [--prompt ids] [--n N] [--eval ids]");
  return a;
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const out = {model: a.model};
  const info = await readGgufFileInfo(a.model, {readTensorInfo: true});
  out.arch = info.metadata?.general?.architecture;
  out.file_type = info.metadata?.general?.file_type;
  out.tensor_types = {};
  for (const t of info.fullTensorInfo ?? info.tensorInfo ?? []) {
    out.tensor_types[t.ggmlType] = (out.tensor_types[t.ggmlType] ?? 0) + 1;
  }

  const logs = [];
  const llama = await getLlama({
    gpu: false,
    build: "never",
    logLevel: LlamaLogLevel.warn,
    logger: (level, message) => logs.push(`${level}: ${message}`),
  });
  let model;
  try {
    model = await llama.loadModel({modelPath: a.model, gpuLayers: 0});
  } catch (e) {
    out.error = `llama.cpp refused the model: ${e.message}`;
    out.log = logs.slice(-20);
    console.log(JSON.stringify(out));
    process.exit(1);
  }
  const need = Math.max((a.prompt?.length ?? 0) + a.n, a.evalIds?.length ?? 0) + 8;
  const context = await model.createContext({
    contextSize: Math.max(64, need),
    batchSize: Math.max(64, need),
    threads: 2,
  });

  if (a.prompt) {
    const seq = context.getSequence();
    const got = [];
    for await (const tok of seq.evaluate(a.prompt, {temperature: 0})) {
      got.push(tok);
      if (got.length >= a.n) break;
    }
    out.greedy = got;
    seq.dispose();
  }

  if (a.evalIds) {
    const seq = context.getSequence();
    const ids = a.evalIds;
    const items = ids.map((t, i) => (i + 1 < ids.length
      ? [t, {generateNext: {probabilities: true, options: {temperature: 1, topK: 0, topP: 1, minP: 0}}}]
      : t));
    const res = await seq.controlledEvaluate(items);
    let nll = 0;
    let n = 0;
    out.logp = [];
    for (let i = 0; i + 1 < ids.length; i++) {
      const probs = res[i]?.next?.probabilities;
      if (!probs) throw new Error(`no probabilities at position ${i}`);
      const lp = Math.log(Math.max(probs.get(ids[i + 1]) ?? 0, 1e-30));
      out.logp.push(lp);
      nll -= lp;
      n++;
    }
    out.nll = nll / n;
    out.ppl = Math.exp(out.nll);
    out.n = n;
    seq.dispose();
  }
  await context.dispose();
  await model.dispose();
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.log(JSON.stringify({error: String(e?.message ?? e)}));
  process.exit(1);
});
