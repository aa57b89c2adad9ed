// llama.cpp's numbers on the same GGUF file and thread count, for
// benches/compare.py's llama.cpp column (through npm `node-llama-cpp`, its
// prebuilt CPU build; benches/compare.sh installs it, the build never does).
//
//   node benches/llama_cpp.mjs MODEL.gguf THREADS [PROMPT_TOKENS...]
//
// Prints one JSON object: decode tok/s after a short prompt (greedy, 128
// tokens), and prefill tok/s for each prompt length (default 512 4096 8000),
// each the median of `--passes` runs (default 3) on a fresh sequence.
import { getLlama } from "node-llama-cpp";

const args = process.argv.slice(2);
const passesAt = args.indexOf("--passes");
const passes = passesAt >= 0 ? Number(args.splice(passesAt, 2)[1]) : 3;
// --decode-only / --prefill-only: one measure (benches/cpu_compare.py takes
// llama.cpp's decode in turns with pensieve's, the VM's speed drifting).
const flag = (f) => (args.includes(f) ? (args.splice(args.indexOf(f), 1), true) : false);
const decodeOnly = flag("--decode-only");
const prefillOnly = flag("--prefill-only");
const [modelPath, threadsArg, ...lens] = args;
const threads = Number(threadsArg || 2);
const lengths = (lens.length ? lens : ["512", "4096", "8000"]).map(Number);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const llama = await getLlama({ gpu: false, maxThreads: threads, logLevel: "error" });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
const contextSize = Math.min(model.trainContextSize, Math.max(...lengths) + 256);
const context = await model.createContext({ contextSize, threads: { ideal: threads, min: threads }, batchSize: 512 });

// Filler text that tokenizes to about one token per word.
const words = "alpha bravo charlie delta echo weather city model token server river mountain garden window".split(" ");
let seed = 1;
const text = (n) => Array.from({ length: n }, () => words[(seed = (seed * 1103515245 + 12345) % 2147483648) % words.length]).join(" ");

const out = { system: "llama.cpp (node-llama-cpp)", version: llama.llamaCppRelease?.release, threads, build: llama.buildType, prefill: {} };

async function freshSequence() {
  const seq = context.getSequence();
  return seq;
}

// Decode: a short prompt, then 128 greedy tokens.
if (!prefillOnly) {
  const rates = [];
  for (let p = 0; p < passes; p++) {
    const seq = await freshSequence();
    const prompt = model.tokenize("Write a long story about a dragon who learns to cook.");
    await seq.evaluateWithoutGeneratingNewTokens(prompt);
    let n = 0;
    let t0 = 0;
    for await (const tok of seq.evaluate([prompt[prompt.length - 1]], { temperature: 0 })) {
      if (n === 0) t0 = performance.now(); // from the first generated token on
      n++;
      if (n >= 129) break;
    }
    rates.push((n - 1) / ((performance.now() - t0) / 1000));
    seq.dispose();
  }
  out.decode_tok_s = median(rates);
}

for (const len of decodeOnly ? [] : lengths) {
  const rates = [];
  for (let p = 0; p < passes; p++) {
    const seq = await freshSequence();
    let toks = model.tokenize(text(len * 2)).slice(0, len);
    const t0 = performance.now();
    await seq.evaluateWithoutGeneratingNewTokens(toks);
    rates.push(toks.length / ((performance.now() - t0) / 1000));
    seq.dispose();
  }
  out.prefill[len] = median(rates);
}
console.log(JSON.stringify(out));
process.exit(0);
