"""What this installation of alast_kernels can run: ``python -m alast_kernels.info [--markdown]``.

Prints the build metadata (versions, what the compiled extension was built for, the switches that change
what runs), each backend's availability on each kind of device and why not, the fine-tuning methods with
their options, which backend `auto` takes per op on CUDA tensors and why (a measured record or the
vendor-first default, :mod:`alast_kernels.backends.measured`), and the table of declared capabilities
(op × backend, from the declarations beside the implementations, collected into each backend's
``SUPPORTS``). ``--markdown`` prints only that table, in the form docs/ops.md shows; a test checks that
copy equals it.

Loading the backends is part of the check: with ``ALAST_CUDA_EMULATION=1`` the emulated kernels are built
on first use (see :mod:`alast_kernels._cuda_emulation`).
"""
from __future__ import annotations

import argparse
import inspect
import os
import platform
import re
from typing import Dict, List, Optional

import torch

from . import __version__, _cuda_emulation, _extension, backend
from .backends import measured
from .backends.support import Call, Supports

SWITCHES = ("ALAST_BACKEND", "TRITON_INTERPRET", "ALAST_CUDA_EMULATION", "ALAST_CACHE_DIR")


def _load_all() -> Dict[str, object]:
    return {name: backend.load(name) for name in backend.BACKENDS}


def build_lines() -> List[str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [f"alast_kernels {__version__}",
             f"  torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
             f"Python {platform.python_version()}"]
    info = _extension.build_info()
    if not info or not info.get("EXTENSION"):
        lines.append("  alast_kernels._C: not built (no CUDA toolkit or GPU at build time, or ALAST_SKIP_CUDA=1)")
    else:
        mismatch = _extension.mismatch(info)
        lines.append(f"  alast_kernels._C: built for torch {info.get('TORCH_VERSION')}, "
                     f"CUDA {info.get('CUDA_VERSION')}, arch {info.get('ARCH_LIST')}, "
                     f"Python {info.get('PYTHON_VERSION')}" + (f" -- MISMATCH: {mismatch}" if mismatch else ""))
    if _cuda_emulation.requested():
        lines.append("  CUDA emulation: requested; its library is built on first use under "
                     f"{_cuda_emulation.cache_root()}")
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    lines.append(f"  GPUs: {', '.join(devices) if devices else 'none visible'}")
    switches = ", ".join(f"{name}={os.environ[name]}" for name in SWITCHES if name in os.environ)
    lines.append(f"  switches: {switches or 'none set'}; backend choice: {backend.get_backend()}")
    return lines


def _usable(module, device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        return "no (no CUDA device visible)"
    refusal = module.device_refusal(device)
    return "yes" if refusal is None else f"no ({refusal})"


def availability_lines(modules: Dict[str, object]) -> List[str]:
    lines = ["backends:"]
    for name, module in modules.items():
        if module is None:
            lines.append(f"  {name:<10} not available: {backend.import_error(name)}")
            continue
        lines.append(f"  {name:<10} {module.DEVICES_NOTE}")
        for device in ("cuda", "cpu"):
            lines.append(f"  {'':<10}   {device} tensors here: {_usable(module, device)}")
    return lines


def auto_lines(modules: Dict[str, object], family: Optional[str] = None, device: str = "") -> List[str]:
    """Which backend ``auto`` takes per op for bfloat16 CUDA tensors of GPU family ``family`` (the compute
    capability, ``None``: no GPU; ``device`` its name) and why: a measured record of the table, or the
    vendor-first default."""
    if family is None:
        head = "no CUDA device visible: the defaults without a measurement"
        measured_families = sorted(measured.table()["records"])
        if measured_families:
            head += f" (the table has records for compute capability {', '.join(measured_families)})"
    else:
        head = f"{device}, compute capability {family}"
    lines = [f"auto on CUDA tensors ({head}; table: {measured.TABLE_PATH.name}):"]
    for op in modules["reference"].OPS:
        order, why = measured.cuda_order(op, family)
        lines.append(f"  {op:<18} {_declared_choice(modules, op, Call('cuda', 'bfloat16'), order) or '-':<10} {why}")
    return lines


# ------------------------------------------------------------------------------------------ capability table
def _declared_choice(modules, op: str, call: Call, order) -> Optional[str]:
    """The backend of ``order`` that ``auto`` takes for ``call`` by the declarations alone (every backend
    assumed usable; a backend that could not be imported is passed over)."""
    for name in order:
        module = modules[name]
        if module is not None and op in module.OPS and not backend.declaration(module, op).refusals(call):
            return name
    return None


def _auto_cell(modules, op: str) -> str:
    """``auto``'s choice on CUDA tensors without a measured record (the table documents the default, the
    same on every machine), and where the calls a kernel declines go instead."""
    order = measured.cuda_order(op, None)[0]
    chosen = _declared_choice(modules, op, Call("cuda", "bfloat16"), order)
    limits = backend.declaration(modules[chosen], op)
    exceptions = []
    probes = [("float64", Call("cuda", "float64"))]
    if limits.max_head_dim is not None:
        probes.append((f"head dim > {limits.max_head_dim}", Call("cuda", "bfloat16", head_dim=limits.max_head_dim + 1)))
    if not limits.k_norm:
        probes.append(("`k_norm`", Call("cuda", "bfloat16", k_norm=True)))
    if limits.max_queries is not None:
        probes.append((f"> {limits.max_queries} queries", Call("cuda", "bfloat16", queries=limits.max_queries + 1)))
    for label, call in probes:
        other = _declared_choice(modules, op, call, order)
        if other != chosen:
            exceptions.append(f"{other} for {label}")
    return chosen + (f" ({'; '.join(exceptions)})" if exceptions else "")


def _cell(module, op: str) -> str:
    if module is None or op not in module.OPS:
        return "—"
    support = backend.declaration(module, op)
    default: Supports = module.DEFAULT_SUPPORT
    limits = [part for part in support.describe().split("; ") if part not in default.describe().split("; ")]
    return support.how + (f" ({'; '.join(limits)})" if limits else "")


def markdown_table(modules: Optional[Dict[str, object]] = None) -> str:
    """The op × backend table of declared capabilities, as the README shows it."""
    modules = _load_all() if modules is None else modules
    missing = [f"{name}: {backend.import_error(name)}" for name, module in modules.items() if module is None]
    if missing:
        raise RuntimeError("the capability table needs every backend loadable: " + "; ".join(missing))
    names = list(modules)
    rows = ["| op | " + " | ".join(names) + " | `auto` on CUDA tensors |",
            "|---" * (len(names) + 2) + "|",
            "| *runs on* | " + " | ".join(modules[n].DEVICES_NOTE for n in names) + f" | {measured.DEFAULT_ORDER} |",
            "| *dtypes* | " + " | ".join(modules[n].DEFAULT_SUPPORT.describe() for n in names) + " | |"]
    for op in modules["reference"].OPS:  # every op has a reference implementation
        cells = " | ".join(_cell(modules[n], op) for n in names)
        rows.append(f"| `{op}` | {cells} | {_auto_cell(modules, op)} |")
    return "\n".join(rows) + "\n"


# -------------------------------------------------------------------------------- docs/ops.md's tables
README_BEGIN = "<!-- backend table: generated by `python -m alast_kernels.info --markdown`, do not edit -->"
README_END = "<!-- end backend table -->"
CONTRACTS_BEGIN = ("<!-- op contracts: generated from the docstrings of alast_kernels.ops by `make backend-table`, "
                   "do not edit -->")
CONTRACTS_END = "<!-- end op contracts -->"


def _call_form(fn) -> str:
    """``select_tokens(scores, keep, num_prefix=1)``: an op's parameters with their defaults."""
    parts, starred = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not starred:
            parts.append("*")
            starred = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"{fn.__name__}({', '.join(parts)})"


def _markdown(docstring: str) -> str:
    """A docstring as one line of markdown: reST literals and roles as code, ``docs/`` pages as links (the
    table is in docs/)."""
    text = " ".join(inspect.cleandoc(docstring).split())
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")
    return re.sub(r"`?docs/([\w/.-]+\.md)`?", r"[\1](\1)", text)


def contract_table() -> str:
    """The ops' contracts, one row per op of :data:`alast_kernels.ops.__all__`, each from its docstring."""
    from . import ops

    rows = ["| op | contract |", "|---|---|"]
    rows += [f"| `{_call_form(getattr(ops, op))}` | {_markdown(getattr(ops, op).__doc__)} |" for op in ops.__all__]
    return "\n".join(rows) + "\n"


def _between(text: str, begin: str, end: str) -> str:
    return text[text.index(begin) + len(begin):text.index(end)].lstrip("\n")


def readme_table(text: str) -> str:
    """The table between docs/ops.md's backend-table markers."""
    return _between(text, README_BEGIN, README_END)


def contracts(text: str) -> str:
    """The table between docs/ops.md's op-contract markers."""
    return _between(text, CONTRACTS_BEGIN, CONTRACTS_END)


def write_readme_table(path: str) -> None:
    """Replace docs/ops.md's generated tables, the contracts and the backends (``make backend-table``)."""
    with open(path) as f:
        text = f.read()
    for begin, end, table in ((CONTRACTS_BEGIN, CONTRACTS_END, contract_table()),
                              (README_BEGIN, README_END, markdown_table())):
        start, stop = text.index(begin) + len(begin), text.index(end)
        text = text[:start] + "\n" + table + text[stop:]
    with open(path, "w") as f:
        f.write(text)


def method_lines() -> List[str]:
    """One line per registered fine-tuning method: its name, what trains, and its options."""
    from . import methods

    lines = ["methods (alast_kernels.methods.create(name, model, **options)):"]
    for name in methods.available():
        cls = methods.method_class(name)
        lines.append(f"  {name:<14} {cls.summary}")
        lines.append(f"  {'':<14} options: {', '.join(methods.options_of(cls)) or 'none'}")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alast_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print only the capability table (README form)")
    args = parser.parse_args(argv)
    modules = _load_all()
    if args.markdown:
        print(markdown_table(modules), end="")
        return
    print("\n".join(build_lines()))
    print()
    print("\n".join(availability_lines(modules)))
    print()
    print("\n".join(method_lines()))
    print()
    family = measured.current_family()
    print("\n".join(auto_lines(modules, family, torch.cuda.get_device_name() if family else "")))
    print()
    print("declared capabilities (what each backend's implementation runs; the dispatcher's input):")
    try:
        print(markdown_table(modules), end="")
    except RuntimeError as exc:
        print(f"  {exc}")


if __name__ == "__main__":
    main()
