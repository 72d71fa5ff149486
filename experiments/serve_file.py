"""`experiments.generate --prompts_file=IN.jsonl`: a request file through the engine.

  python -m experiments.generate --hf_model=DIR --prompts_file=in.jsonl --output=out.jsonl \
      --max_batch=32 [--page_size=16 --num_pages=0]

Every input line is one request, a JSON object with `prompt` (text, tokenised by the
model's tokenizer) or `prompt_ids` (a list of ids), and optionally any of
REQUEST_FIELDS; the command's flags give the defaults of the others (--strategy,
--max_new_tokens, --temperature, ...). `stop_ids` adds stop tokens to the model's
EOS. Every line is checked (JSON, known keys, GenerationConfig's validation) before
anything compiles, and an error names the line and the field. The requests run
through the continuous-batching engine (decode/engine.py) with --max_batch slots
over one paged cache; output line i is request i (`index`, `tokens`, `text`,
`logprob`), in input order, written all at once or not at all.
"""

from __future__ import annotations

import json

from decode.config import GenerationConfig
from decode.engine import Engine, Request

REQUEST_FIELDS = ("max_new_tokens", "strategy", "temperature", "top_k", "top_p", "min_p",
                  "repetition_penalty", "seed", "stop_ids")


def read_requests(path: str, tok, defaults: GenerationConfig) -> list[Request]:
  """The requests of a JSONL file; ValueError naming the line and field if one is bad."""
  requests = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"--prompts_file line {n}"
      try:
        d = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
      if not isinstance(d, dict):
        raise ValueError(f"{where}: must be a JSON object")
      unknown = sorted(set(d) - {"prompt", "prompt_ids", *REQUEST_FIELDS})
      if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: prompt, prompt_ids, "
                         f"{', '.join(REQUEST_FIELDS)}")
      if ("prompt" in d) == ("prompt_ids" in d):
        raise ValueError(f"{where}: give exactly one of prompt and prompt_ids")
      if "prompt" in d:
        if not isinstance(d["prompt"], str):
          raise ValueError(f"{where}: prompt must be a string (got {d['prompt']!r})")
        prompt = tok.encode(d["prompt"])
      else:
        prompt = d["prompt_ids"]
        if not isinstance(prompt, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
          raise ValueError(f"{where}: prompt_ids must be a list of integers")
      fields = {k: d[k] for k in REQUEST_FIELDS if k in d and k != "stop_ids"}
      stop = d.get("stop_ids", [])
      if not isinstance(stop, list) or not all(isinstance(t, int) for t in stop):
        raise ValueError(f"{where}: stop_ids must be a list of integers")
      if stop:
        fields["eos_token_id"] = tuple(defaults.eos_token_id) + tuple(stop)
      if fields.get("strategy", defaults.strategy) != "sample":
        fields.update({k: v for k, v in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0),
                                          ("min_p", 0.0)) if k not in fields})
      try:
        gen = GenerationConfig.from_dict({**_fields(defaults), **fields})
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
      requests.append(Request(tuple(prompt), gen))
  if not requests:
    raise ValueError(f"--prompts_file: no request in {path}")
  return requests


def _fields(gen: GenerationConfig) -> dict:
  return {k: getattr(gen, k) for k in gen.__dataclass_fields__}


def serve(cfg, params, tok, requests, *, max_batch: int, page_size: int, num_pages: int,
          attention_impl: str = "auto", moe_impl: str = "auto", progress: bool = True):
  """Runs the engine; returns (records in input order, EngineStats)."""
  engine = Engine(cfg, params, requests, max_batch=max_batch, page_size=page_size,
                  num_pages=num_pages, attention_impl=attention_impl, moe_impl=moe_impl)
  done = engine.run(progress=progress)
  records = [{"index": i, "tokens": c.tokens, "text": tok.decode(c.tokens),
              "logprob": c.logprob} for i, c in enumerate(done)]
  return records, engine.stats
