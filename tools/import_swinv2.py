"""Import a timm-layout SwinV2 checkpoint as this project's dense model (the way back in).

    python -m tools.import_swinv2 --safetensors demo_out/compressed/export/model.safetensors \
        --config configs/NAME.py --out /tmp/imported [--modality optical] [--config.seed=0]

Reads a SwinV2 state dict in timm's layout (ours from `tools.compress`, or a public
SwinV2 in timm's native or the original layout) into the dense model of --config
(model.moe.enabled = False; the modality with a plain patch embedding) and saves it
where `tools.evaluate --checkpoint` and upcycling read it. A tensor that is missing,
unexpected or of another shape is a one-line error naming it and both shapes. The
SimMIM mask token and decoders are not in a SwinV2 checkpoint: they keep their
initial values (config.seed) and the JSON last line lists them, with `out`,
`modality`, `tensors` and `parameters` (imported).
"""
import json

from absl import flags
from ml_collections import config_flags

from ringmoe import cli

_SAFETENSORS = flags.DEFINE_string("safetensors", None, "timm-layout SwinV2 weights (.safetensors).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Dense config (configs/NAME.py) the weights go into.")
_OUT = flags.DEFINE_string("out", None, "Directory of the saved model (new or empty).")
_MODALITY = flags.DEFINE_string("modality", None, "The modality the weights are for (default: the config's "
                                "only one).")


def main(argv) -> None:
    cli.no_arguments(argv)
    cli.setup_logging()
    from pretrain.validate import validate_config
    from ringmoe.compress.timm_layout import import_swinv2
    from ringmoe.model.checkpoint import save_model
    config = _CONFIG.value
    validate_config(config)
    model, report = import_swinv2(_SAFETENSORS.value, config, _MODALITY.value)
    out = save_model(_OUT.value, config, model, {"imported": {k: v for k, v in report.items()}})
    print(f"imported {report['tensors']} tensors ({report['parameters']:,} parameters) into {out}; "
          f"initialised from config.seed, not imported: {', '.join(report['initialised_not_imported']) or 'none'}")
    print(json.dumps({"out": out, **report}))


if __name__ == "__main__":
    cli.run_absl("tools.import_swinv2", main, required=("safetensors", "config", "out"))
