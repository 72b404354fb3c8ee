"""The package's shape (DESIGN.md "Layers"), read from the source: which package may import which, no import
circles (lazy imports inside functions included), no process groups under model/, no family tests outside
config and the converters, and a GPT.forward that knows nothing of variants, caches' types or parallelism."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# what each package may import (besides itself); experiments and cli sit on top and may import anything
ALLOWED = {
    "errors": set(),
    "outdir": {"errors"},
    "fused_ops": set(),
    "config": {"errors"},
    "data": {"errors"},
    "model": {"fused_ops", "config", "errors"},
    "parallel": {"model", "fused_ops", "config", "errors"},
    "checkpoint": {"parallel", "model", "config", "errors"},
    "engine": {"checkpoint", "parallel", "model", "config", "errors"},
    "training": {
        "engine",
        "checkpoint",
        "parallel",
        "model",
        "data",
        "fused_ops",
        "config",
        "errors",
    },
    "convert": {"checkpoint", "model", "data", "fused_ops", "config", "outdir", "errors"},
    "inference": {"checkpoint", "model", "data", "fused_ops", "config", "outdir", "errors"},
}


def modules() -> dict[str, Path]:
    out = {}
    for f in [*(ROOT / "megatron_sep").rglob("*.py"), *(ROOT / "fused_ops").rglob("*.py")]:
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every project module each module imports, at its top or inside a function."""
    out = {}
    for m, f in mods.items():
        here = m if f.name == "__init__.py" else m.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (
                    here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
                )
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for t in names:
                while t not in mods and "." in t:
                    t = t.rpartition(".")[0]
                if t in mods and t != m:
                    found.add(t)
        out[m] = found
    return out


def package(m: str) -> str:
    parts = m.split(".")
    return parts[1] if parts[0] == "megatron_sep" and len(parts) > 1 else parts[0]


def test_each_package_imports_only_the_layers_below_it():
    mods = modules()
    wrong = sorted(
        f"{m} -> {t}"
        for m, ts in imports(mods).items()
        for t in ts
        if package(m) in ALLOWED
        and package(t) != package(m)
        and package(t) not in ALLOWED[package(m)]
    )
    assert not wrong, wrong


def test_no_import_circles():
    graph = imports(modules())
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(path[path.index(t) :] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_model_is_plain():
    model = [f for m, f in modules().items() if package(m) == "model"]
    assert model
    for f in model:
        text = f.read_text()
        assert "torch.distributed" not in text, f"{f.name} uses process groups"
    gpt = (ROOT / "megatron_sep/model/gpt.py").read_text()
    forward = gpt[gpt.index("class GPT(") :]
    for word in (
        "hasattr(",
        "getattr(",
        "subllm",
        "structure",
        "seq_shards",
        "Teacher",
        "isinstance(labels",
    ):
        assert word not in forward, f"GPT knows {word!r}"


def test_family_is_read_in_config_and_converters_only():
    found = []
    for m, f in modules().items():
        if package(m) in ("config", "convert"):
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"family\s*[!=]=|[!=]=\s*\S*family\b", line):
                found.append(f"{f.relative_to(ROOT)}:{i}")
    assert not found, found


def test_engines_and_caches_implement_their_protocols():
    """Every engine answers the Engine protocol and every decoding cache the DecodeCache protocol, so the
    trainer, the checkpoint store and the attention use nothing else of them."""
    from megatron_sep.engine import Engine
    from megatron_sep.engine.deepspeed import DeepSpeedEngine
    from megatron_sep.engine.native import NativeEngine
    from megatron_sep.inference.cache import LevelCache, SepKVCache
    from megatron_sep.inference.sep_cache import SepCache
    from megatron_sep.inference.static_cache import StaticKVCache
    from megatron_sep.model.cache import DecodeCache

    def members(protocol):
        own = set(vars(protocol)) | set(getattr(protocol, "__annotations__", {}))
        return {m for m in own if not m.startswith("_")}

    for cls in (NativeEngine, DeepSpeedEngine):
        # attributes set in __init__ (model, ctx, cfg) are read from the constructor's source
        missing = [
            m for m in members(Engine) if not hasattr(cls, m) and f"self.{m}" not in _source(cls)
        ]
        assert not missing, (cls.__name__, missing)
    for cls in (SepKVCache, LevelCache, SepCache, StaticKVCache):
        missing = [
            m
            for m in members(DecodeCache)
            if not hasattr(cls, m) and f"self.{m}" not in _source(cls)
        ]
        assert not missing, (cls.__name__, missing)
        assert "rope" in __import__("inspect").signature(cls.attend).parameters, cls.__name__


def _source(cls) -> str:
    import inspect

    return inspect.getsource(cls)
