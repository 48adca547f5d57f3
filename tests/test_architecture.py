"""The package layering: a lower layer never imports a higher one, and nothing imports in a
circle. Read from the source (every import, also those inside functions)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_ztt"
# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    ("files", "model.cycle_engine", "model.exit_policy"),
    # parallel.sequence: the sequence-parallel collectives the model's layers call (torch and
    # megatron-core only)
    ("model", "parallel.sequence"),
    ("parallel",),
    ("data",),
    ("config",),
    ("checkpoint",),
    ("pretrained",),  # ztt import-hf: model, parallel, data, config, checkpoint, files
    ("training",),
    ("export", "inference", "tools"),
    ("cli", "train", "__init__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def layer_of(module: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    assert best is not None, f"megatron_ztt.{module} belongs to no layer of {LAYERS}"
    return best[0]


def project_imports():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "hf_template" in path.parts:  # shipped into exports: imports no project code
            continue
        name = module_name(path)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("megatron_ztt"):
                    imported.add(node.module)
                    imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("megatron_ztt"))
        graph[name] = {m[len("megatron_ztt."):] for m in imported
                       if m.startswith("megatron_ztt.")}
    modules = set(graph)
    # keep real modules only ("from megatron_ztt.x import y" where y is a function -> x)
    return {m: {i for i in deps if i in modules} for m, deps in graph.items()}


def test_no_lower_layer_imports_a_higher_one():
    wrong = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
             for m, deps in project_imports().items() for d in sorted(deps)
             if layer_of(d) > layer_of(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = project_imports()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_only_the_runtime_touches_cuda_and_only_the_engine_boundary_deepspeed():
    """One place decides device and backend; DeepSpeed's API stays behind the engines."""
    allowed_deepspeed = {"training.engines", "parallel.runtime",
                         "parallel.mpu", "training.checkpoint", "training.optimizer"}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = module_name(path)
        if name != "parallel.runtime":
            assert "torch.cuda" not in text, f"{name} calls torch.cuda"
        if name not in allowed_deepspeed and "hf_template" not in path.parts:
            assert "import deepspeed" not in text and "from deepspeed" not in text, name
            for private in ("_grid", "mp_rank_", "model_states.pt", "forward_funcs"):
                assert private not in text, f"{name} reaches into DeepSpeed ({private})"


def test_the_cycle_loops_core_reads_in_under_120_lines():
    """The zero key, the gate and the cycle loop sit between two markers in cycle_engine.py;
    the bookkeeping (plan, state, active block, statistics, objective, exit policy) is outside."""
    lines = (PACKAGE / "model" / "cycle_engine.py").read_text().splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith("# ====") and "the core:" in line]
    end = [i for i, line in enumerate(lines) if line.startswith("# ====") and "end of the core" in line]
    assert len(start) == len(end) == 1 and start[0] < end[0]
    core = "\n".join(lines[start[0]:end[0]])
    for piece in ("def zero_key_attention", "class CycleGate", "class CycleLoop", "def close_cycle"):
        assert piece in core, piece
    assert end[0] - start[0] - 1 < 120
