"""Per-device memory of a lowered program, from XLA's buffer assignment.

Two ways to the same four numbers (`MemoryStats`, the fields of XLA's
CompiledMemoryStats: entry parameters, live-out outputs, temporaries, and the
bytes shared by a parameter and an output, i.e. donated buffers):

* `from_compiled`: `compiled.memory_analysis()` of a finished compile;
* `cpu_buffer_assignment`: the CPU compiler's buffer assignment, read from the
  dump XLA writes right after assigning buffers, without waiting for the CPU
  executable. Building that executable ends with the CPU runtime's execution
  graph, whose construction is quadratic in the number of kernels: minutes for
  small programs, hours for the unrolled 14.7B train step (measured: still in
  `ExecutionGraph::RunTransitiveReductionAndUpdatePriorities` after 75 min). The
  numbers are the same ones `memory_analysis()` reports (tests/test_aot.py
  compares both on a small config); the compile is left running in a daemon
  thread, so the caller must end the process with `os._exit` when done.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import tempfile
import threading
import time

_ALLOCATION = re.compile(r"allocation \d+: size (\d+), (.*)")
_VALUE = re.compile(r" value: <\d+ (\S+) @\S+> \(size=(\d+),offset=\d+\): (\S+)")


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int

    @property
    def total_bytes(self) -> int:
        """What one device holds at the peak: arguments + outputs + temporaries, donated
        buffers counted once."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def from_compiled(compiled) -> MemoryStats:
    m = compiled.memory_analysis()
    return MemoryStats(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                       int(m.alias_size_in_bytes))


def parse_buffer_assignment(text: str) -> MemoryStats:
    """Sums XLA's `*-buffer-assignment.txt` the way CompiledMemoryStats does: parameter
    allocations, live-out allocations (both: aliased), the preallocated temp buffer."""
    args = outs = temps = alias = 0
    for line in text.splitlines():
        match = _ALLOCATION.match(line)
        if not match:
            continue
        size, kinds = int(match.group(1)), match.group(2)
        parameter = ", parameter " in f", {kinds}"
        live_out = "maybe-live-out" in kinds or "output shape is" in kinds
        args += size * parameter
        outs += size * live_out
        alias += size * (parameter and live_out)
        temps += size * ("preallocated-temp" in kinds)
    return MemoryStats(args, outs, temps, alias)


def largest_temporaries(text: str, count: int) -> list[tuple[str, str, int]]:
    """(HLO instruction, shape, bytes) of the largest values in the preallocated temp buffer of
    a `*-buffer-assignment.txt` (values whose live ranges do not overlap share bytes)."""
    values, inside = [], False
    for line in text.splitlines():
        if line.startswith("allocation "):
            inside = "preallocated-temp" in line
        elif inside and (match := _VALUE.match(line)):
            values.append((match.group(1), match.group(3).split("{")[0], int(match.group(2))))
    return sorted(values, key=lambda v: -v[2])[:count]


def cpu_buffer_assignment(lowered, module_name: str, *, keep_dump: str | None = None, largest: int = 8,
                          poll_s: float = 1.0) -> tuple[MemoryStats, list[tuple[str, str, int]]]:
    """Compiles `lowered` for the CPU in a daemon thread and returns its buffer assignment (the
    stats and the largest temporaries) as soon as XLA has dumped it. The thread keeps compiling;
    end the process with os._exit. `keep_dump`: a directory to leave XLA's dump in."""
    dump = keep_dump or tempfile.mkdtemp(prefix="ringmoe_aot_")
    options = {"xla_dump_to": dump, "xla_dump_hlo_module_re": f"^{re.escape(module_name)}$",
               "xla_dump_emitter_re": "^$"}
    failure: list[BaseException] = []

    def compile_():
        try:
            lowered.compile(options)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    thread = threading.Thread(target=compile_, name="xla-cpu-compile", daemon=True)
    thread.start()
    pattern = os.path.join(dump, f"*{module_name}.cpu_after_optimizations-buffer-assignment.txt")
    report = pattern.replace("buffer-assignment", "memory-usage-report")  # written after it
    while not glob.glob(report):
        if failure:
            raise failure[0]
        if not thread.is_alive() and not glob.glob(report):
            raise RuntimeError(f"XLA finished compiling {module_name} but dumped no buffer assignment in {dump}")
        time.sleep(poll_s)
    with open(glob.glob(pattern)[0]) as f:
        text = f.read()
    if not keep_dump:
        shutil.rmtree(dump, ignore_errors=True)
    return parse_buffer_assignment(text), largest_temporaries(text, largest)
