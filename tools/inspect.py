"""Summarise a RingMoE data set and decode every record to count bad ones.

    python -m tools.inspect DIR

Prints records, modalities (sensors, bands with mean/std), paired counts and labels,
then as its LAST stdout line one JSON object with `records`, `decoded`,
`bad_records`, `modalities` (records per modality), `paired_records`,
`single_modality_records`, `label_names` and `errors` (first few). Exit status 1
when any record is bad, 2 when the data set itself (directory, manifest) is unusable.
Run it as a module: `python tools/inspect.py` would shadow the stdlib `inspect`.
"""
import json
import sys

from ringmoe import cli
from ringmoe.data import shards
from ringmoe.data.schema import RecordError


def _summary(m: dict) -> list[str]:
    check = m["check"]
    lines = [f"data set: {m['source']} (schema v{m['schema_version']})",
             f"records: {m['records']} in {len(m['shards'])} shard(s); decoded {check['decoded']}, "
             f"bad {check['bad_records']}",
             f"paired: {m['paired_records']}, single-modality: {m['single_modality_records']}; "
             f"sets {m['modality_sets']}"]
    for name, mod in m["modalities"].items():
        lines.append(f"{name}: {mod['records']} records, unit {mod['unit']}, sensors {mod['sensors']}")
        for band, mean, std, n in zip(mod["bands"], mod["mean"], mod["std"], mod["valid_pixels"]):
            physics = ", ".join(f"{k}={v}" for k, v in band.items() if k != "name")
            stat = "no valid pixels" if mean is None else f"mean {mean:10.4f}  std {std:9.4f}"
            lines.append(f"  {band['name']:>6}  {stat}  valid {n:>10}  ({physics})")
    labels = m["labels"]
    names = m["label_names"]
    def named(counts):
        return {(names[int(k)] if int(k) < len(names) else k): v for k, v in counts.items()}
    if labels["label_map_records"]:
        lines.append(f"label maps: {labels['label_map_records']} records, pixels per class "
                     f"{named(labels['label_map_pixels'])}")
    if labels["scene_label_records"]:
        lines.append(f"scene labels: {labels['scene_label_records']} records, per class "
                     f"{named(labels['scene_label_counts'])}")
    for message in check["errors"]:
        lines.append(f"bad: {message}")
    return lines


def main(argv) -> None:
    if len(argv) != 2:
        raise cli.UsageError("one argument: the data set directory (python -m tools.inspect DIR)")
    m = shards.check_dataset(argv[1])
    print("\n".join(_summary(m)))
    check = m["check"]
    print(json.dumps({
        "records": m["records"], "decoded": check["decoded"], "bad_records": check["bad_records"],
        "modalities": {k: v["records"] for k, v in m["modalities"].items()},
        "paired_records": m["paired_records"], "single_modality_records": m["single_modality_records"],
        "label_names": m["label_names"], "errors": check["errors"]}))
    sys.exit(1 if check["bad_records"] else 0)


if __name__ == "__main__":
    cli.run_absl("tools.inspect", main, status={RecordError: 2})  # 2: a data set it cannot read at all
