"""Import a Hugging Face-format language model (Llama, SmolLM, Qwen2) as this project's saved LM.

    python -m tools.import_lm --from path/to/SmolLM2-135M --out /tmp/smollm2 [--dtype float32]

Reads config.json, model.safetensors (or the shards of model.safetensors.index.json)
and tokenizer.json if there is one (ringmoe/text/hf.py) and writes lm.json,
model.safetensors and tokenizer.json to --out (new or empty), which
`ringmoe.text.saved.load_lm` reads. A config the model cannot follow exactly (another
model_type, a rope scaling other than default / linear / llama3, ...) or a tensor
missing, unexpected or of another shape is a one-line error naming the key or tensor
and the file. Last line: JSON with out, model_type, parameters, spec and tokenizer.
"""
import json
import os

from absl import flags

from ringmoe import cli

_FROM = flags.DEFINE_string("from", None, "Hugging Face checkpoint directory (config.json, safetensors "
                            "[, tokenizer.json]).", required=True)
_OUT = flags.DEFINE_string("out", None, "Directory of the saved model (new or empty).", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Compute dtype recorded in the spec (parameters stay float32).")


def main(argv) -> None:
    cli.no_arguments(argv)
    cli.setup_logging()
    from ringmoe.text.hf import load_hf
    from ringmoe.text.saved import save_lm, spec_dict
    source = os.path.abspath(_FROM.value)
    model, tokenizer, info = load_hf(source, dtype=_DTYPE.value)
    out = save_lm(_OUT.value, model, info["tokenizer"],
                  {"imported": {"from": source, "model_type": info["model_type"]}})
    print(f"imported {info['model_type']} ({info['parameters']:,} parameters) from {source} into {out}; "
          f"tokenizer: {'yes' if tokenizer is not None else 'none'}")
    print(json.dumps({"out": out, "model_type": info["model_type"], "parameters": info["parameters"],
                      "spec": spec_dict(info["spec"]), "tokenizer": tokenizer is not None}))


if __name__ == "__main__":
    cli.run_absl("tools.import_lm", main)
