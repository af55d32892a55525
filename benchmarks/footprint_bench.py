"""The agent's footprint on a device: install size, idle memory, memory with SmolLM2 int4, cold start.

    python benchmarks/footprint_bench.py --json footprint.json

1. Install: a fresh venv (no system site-packages) gets what a device installs, `pip install <repo>/agent`
   (the `slmops-agent` distribution; `--install extra`: `pip install '<repo>[agent]'`, the whole `slmops`
   distribution with its agent extra, as before agent/pyproject.toml). pip resolves from this machine's
   configured index. Its size is the bytes of the files in site-packages (apparent size, MiB: 1 MiB =
   1.048576 MB), without pip and setuptools (a device image need not keep them), and the share of
   that which is bytecode pip compiled at install (__pycache__); the largest distributions are
   listed, and whether fleet or builder code came along.
2. Idle: `slmops agent run` from that venv on an empty state folder (no model, defaults otherwise:
   gRPC on TCP and the Unix socket, the loopback HTTP server on); VmRSS 2 s after its ready line.
   Then again under `import_rss.py`: the VmRSS each top-level package's imports add
   (`details.idle_imports`, the largest printed).
3. With the model: the SmolLM2 cpu-int4 package (built by the builder from the tests' cache, signed
   with a throw-away key) side-loaded with `slmops agent install`, then `slmops agent run` again:
   - cold start: from the process's start to the first streamed text of a first request sent at
     the ready line (gRPC over TCP), including Python's start, the imports and the model's load;
     the median of `--cold-starts` starts (the first one is measured further, the others stopped at
     their first token);
   - loaded: VmRSS at the ready line; after one: when the first request (64 new tokens) ended;
   - burst: `queue_bound` concurrent requests (the queue's bound: all admitted), peak VmRSS during it,
     then VmRSS sampled for 10 s of idle: `after_burst_mb` is the last sample.
   The KV cache share is computed from the model's shape (layers, KV heads, head size, fp32 or fp16)
   for the agent's context length and batch slots.
4. After use: site-packages measured again once the agent has run (with `--no-compile` pip compiled
   nothing at install, so this holds only the bytecode of what the agent imported).

RSS is the main figure (exact, repeatable); the timings are noisy on a shared machine (say so
when you quote them). The bench's client runs in the interpreter that runs the bench (it needs grpcio
and slmops_protos); only the agent runs in the fresh venv.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "protos"), str(ROOT / "agent"), str(ROOT / "builder")]

PROMPT = "<|im_start|>user\nWrite a long story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
MIB = 1024 * 1024
NOT_INSTALLED = ("pip", "setuptools")  # a device image need not keep the installers


# -- install ----------------------------------------------------------------------------------
INSTALLS = {"device": "{repo}/agent", "extra": "{repo}[agent]"}


def make_venv(repo: Path, venv: Path, install: str, compile_bytecode: bool) -> float:
    """A fresh venv with only the device's install; returns the seconds pip took."""
    compile_flag = [] if compile_bytecode else ["--no-compile"]
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    t0 = time.perf_counter()
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--no-cache-dir",
            *compile_flag,
            INSTALLS[install].format(repo=repo),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python*/site-packages"))


def install_size(venv: Path) -> dict[str, Any]:
    """Bytes of the files under site-packages, by distribution (RECORD), less pip and setuptools."""
    sp = site_packages(venv)
    code = (
        "import importlib.metadata as m, json, os\n"
        "out = {}\n"
        "for d in m.distributions():\n"
        "    files = [str(d.locate_file(f)) for f in d.files or []]\n"
        "    out[d.metadata['Name']] = files\n"
        "print(json.dumps(out))\n"
    )
    listed = json.loads(
        subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True).stdout
    )
    owner: dict[str, str] = {}
    for name, files in listed.items():
        for f in files:
            owner[os.path.realpath(f)] = name
    sizes: dict[str, int] = {}
    bytecode = 0
    for dirpath, _dirs, files in os.walk(sp):
        for f in files:
            path = os.path.realpath(os.path.join(dirpath, f))
            rel = os.path.relpath(path, sp).split(os.sep)[0]
            name = owner.get(path) or _owner_by_top(rel)
            size = os.path.getsize(path)
            sizes[name] = sizes.get(name, 0) + size
            if name not in NOT_INSTALLED and f.endswith(".pyc"):
                bytecode += size
    total = sum(v for k, v in sizes.items() if k not in NOT_INSTALLED)
    tops = sorted(sizes.items(), key=lambda kv: -kv[1])
    dev_code = sorted(p.name for p in sp.iterdir() if p.name in ("slmops_fleet", "slmops_builder"))
    return {
        "install_mb": total / MIB,
        "with_installers_mb": sum(sizes.values()) / MIB,
        "bytecode_mb": bytecode / MIB,
        "top": [(k, v / MIB) for k, v in tops[:15]],
        "not_device_code": dev_code,
        "cli_extras": sorted(k for k in sizes if k.lower() in ("rich", "pygments", "typer", "click", "markdown-it-py")),
    }


def _owner_by_top(top: str) -> str:
    """Files no RECORD lists (compiled later, caches): pip's and setuptools' by name, others under
    their top-level folder (counted)."""
    if top.startswith("pip"):
        return "pip"
    if top.startswith(("_distutils_hack", "distutils-precedence", "setuptools", "pkg_resources")):
        return "setuptools"
    return f"(unlisted) {top}"


# -- the agent process ------------------------------------------------------------------------
MEASURED_CLI = (
    "import sys; sys.path.insert(0, {bench!r}); import import_rss\nfrom slmops_cli.main import main\nmain()\n"
)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Agent:
    """`slmops agent run` from the venv, its stderr watched for the ready line."""

    def __init__(self, venv: Path, state: Path, env: dict[str, str], imports_to: Path | None = None) -> None:
        self.state = state
        self.t0 = time.perf_counter()
        program = [str(venv / "bin" / "slmops")]
        if imports_to is not None:  # the same program, import_rss.py loaded first
            program = [str(venv / "bin" / "python"), "-c", MEASURED_CLI.format(bench=str(ROOT / "benchmarks"))]
            env = {**env, "IMPORT_RSS_OUT": str(imports_to)}
        self.proc = subprocess.Popen(
            [*program, "agent", "run", "--state-dir", str(state)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.log: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            if "slmops agent listening on" in line:
                self.ready.set()

    def wait_ready(self, timeout: float = 120.0) -> float:
        if not self.ready.wait(timeout):
            self.stop()
            raise SystemExit("the agent did not start:\n" + "\n".join(self.log[-20:]))
        return time.perf_counter() - self.t0

    @property
    def address(self) -> str:
        return (self.state / "grpc.addr").read_text().strip()

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def generate(address: str, new_tokens: int, first: list[float] | None = None) -> int:
    """One greedy streamed Generate; appends the time of its first text to `first`."""
    from slmops_agent.client import open_channel
    from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

    with open_channel(address) as channel:
        stub = agent_pb2_grpc.InferenceStub(channel)
        request = agent_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=new_tokens, temperature=0.0)
        tokens = 0
        for chunk in stub.Generate(request, timeout=300):
            if chunk.text and first is not None and not first:
                first.append(time.perf_counter())
            if chunk.HasField("usage"):
                tokens = chunk.usage.completion_tokens
        return tokens


def cold_start(venv: Path, state: Path, env: dict[str, str]) -> float:
    """Milliseconds from `slmops agent run`'s start to the first text of a request sent at its ready line."""
    agent = Agent(venv, state, env)
    try:
        agent.wait_ready()
        first: list[float] = []
        generate(agent.address, 1, first)
        return (first[0] - agent.t0) * 1000
    finally:
        agent.stop()


# -- the model --------------------------------------------------------------------------------
def build_package(out: Path) -> tuple[Path, Path]:
    """The SmolLM2 cpu-int4 package (the conversion cached in .cache/builder) and its public key."""
    from agent_bench import default_hf_dir, default_model_dir

    from slmops_builder.build import build_package as build
    from slmops_builder.keys import generate_key, public_path

    hf = default_hf_dir(default_model_dir())
    if hf is None:
        raise SystemExit("no imported SmolLM2 in .cache/smollm2-hf: run `pytest -m smollm2` once")
    key = out / "bench.key"
    generate_key(key)
    written = build(hf, "cpu-int4", "smollm2", "1.0.0", key, out / "package", cache_dir=ROOT / ".cache" / "builder")
    return written.path, public_path(key)


def kv_bytes_per_token(model_dir: Path) -> int:
    """Bytes of KV cache one token of one sequence takes (keys and values, every layer)."""
    cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    kv_heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    itemsize = 2 if "fp16" in json.dumps(cfg).lower() else 4
    return 2 * int(cfg["num_hidden_layers"]) * kv_heads * int(cfg["head_size"]) * itemsize


def weights_mb(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.name.startswith("model.onnx")) / MIB


# -- the run ------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, venv: Path, work: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLMOPS_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(SLMOPS_AGENT_GRPC_ADDRESS="127.0.0.1:0", SLMOPS_AGENT_LOG_LEVEL="INFO")
    env.update({f"SLMOPS_AGENT_{k.upper()}": v for k, v in args.setting})
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    out: dict[str, Any] = {}

    idle = Agent(venv, work / "idle-state", env)
    out["idle_start_ms"] = idle.wait_ready() * 1000
    time.sleep(2)
    out["idle_rss_mb"] = idle.rss()
    idle.stop()
    imports = work / "idle-imports.json"
    measured = Agent(venv, work / "idle-imports-state", env, imports_to=imports)
    measured.wait_ready()
    time.sleep(2)
    out["idle_measured_rss_mb"] = measured.rss()
    measured.stop()
    out["idle_imports"] = json.loads(imports.read_text())

    package, pub = build_package(work)
    state = work / "state"
    subprocess.run(
        [
            str(venv / "bin" / "slmops"),
            "agent",
            "install",
            str(package),
            "--state-dir",
            str(state),
            "--trust-key",
            str(pub),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    slot = (state / "slots" / "current").resolve()
    model_dir = slot if (slot / "genai_config.json").is_file() else next(state.glob("slots/*/genai_config.json")).parent
    out["model_weights_mb"] = weights_mb(model_dir)
    context = json.loads((model_dir / "genai_config.json").read_text())["model"]["context_length"]

    starts = [cold_start(venv, state, env) for _ in range(args.cold_starts - 1)]
    agent = Agent(venv, state, env)
    out["ready_ms"] = agent.wait_ready() * 1000
    first: list[float] = []
    address = agent.address
    loaded = agent.rss()
    generate(address, args.new_tokens, first)
    starts.append((first[0] - agent.t0) * 1000)
    out["cold_starts_ms"] = [round(ms) for ms in starts]
    out["cold_start_first_token_ms"] = statistics.median(starts)
    out["loaded_rss_mb"] = loaded
    out["after_one_mb"] = agent.rss()

    bound = args.burst or int(env.get("SLMOPS_AGENT_QUEUE_BOUND", 8))
    peak = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], agent.rss())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with concurrent.futures.ThreadPoolExecutor(bound) as pool:
        list(pool.map(lambda _: generate(address, args.new_tokens), range(bound)))
    done.set()
    watcher.join()
    samples = []
    for _ in range(20):
        time.sleep(0.5)
        samples.append(agent.rss())
    out.update(burst=bound, burst_peak_mb=peak[0], after_burst_mb=samples[-1], after_burst_samples=samples)
    out["vm_hwm_mb"] = rss_mb(agent.proc.pid, "VmHWM")
    out["agent_log_head"] = [line for line in agent.log if "context" in line or "KV" in line][:3]
    agent.stop()

    per_token = kv_bytes_per_token(model_dir)
    out["kv_bytes_per_token"] = per_token
    out["model_context"] = context
    out["kv_full_context_mb"] = per_token * context / MIB
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout to install (default: this one)")
    parser.add_argument(
        "--install",
        choices=sorted(INSTALLS),
        default="device",
        help="device: pip install <repo>/agent (default); extra: pip install '<repo>[agent]'",
    )
    parser.add_argument("--venv", type=Path, help="reuse this venv (made with the agent extra) instead of a fresh one")
    parser.add_argument(
        "--no-compile", action="store_true", help="pip install --no-compile: bytecode only for what the agent imports"
    )
    parser.add_argument("--cold-starts", type=int, default=5, help="starts to take the cold start's median of")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--burst", type=int, default=0, help="concurrent requests (default: the queue's bound, 8)")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        type=lambda kv: tuple(kv.split("=", 1)),
        metavar="KEY=VALUE",
        help="an agent setting for every start (SLMOPS_AGENT_KEY), e.g. int4_compute=fp32; repeatable",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        work = Path(tmp)
        venv = args.venv or work / "venv"
        pip_s = make_venv(args.repo.resolve(), venv, args.install, not args.no_compile) if args.venv is None else 0.0
        size = install_size(venv)
        figures = measure(args, venv, work)
        used = install_size(venv)
        if args.venv is None:
            shutil.rmtree(venv, ignore_errors=True)
    result = {
        "install_mb": round(size["install_mb"], 1),
        "idle_rss_mb": round(figures["idle_rss_mb"], 1),
        "model_weights_mb": round(figures["model_weights_mb"], 1),
        "loaded_rss_mb": round(figures["loaded_rss_mb"], 1),
        "after_one_mb": round(figures["after_one_mb"], 1),
        "after_burst_mb": round(figures["after_burst_mb"], 1),
        "cold_start_first_token_ms": round(figures["cold_start_first_token_ms"]),
        "details": {
            "pip_s": round(pip_s, 1),
            "no_compile": args.no_compile,
            "settings": dict(args.setting),
            "after_use_mb": used["install_mb"],
            "after_use_bytecode_mb": used["bytecode_mb"],
            **size,
            **figures,
        },
    }
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def print_table(r: dict[str, Any]) -> None:
    d = r["details"]
    rows = [
        (
            "install (site-packages, no pip/setuptools)",
            f"{r['install_mb']:.1f} MiB ({r['install_mb'] * 1.048576:.1f} MB)",
        ),
        ("  of which bytecode compiled at install", f"{d['bytecode_mb']:.1f} MiB"),
        (
            "  after the agent ran (bytecode then)",
            f"{d['after_use_mb']:.1f} MiB = {d['after_use_mb'] * MIB / 1e6:.1f} MB ({d['after_use_bytecode_mb']:.1f})",
        ),
        ("  fleet/builder code installed", ", ".join(d["not_device_code"]) or "none"),
        ("  CLI presentation libraries", ", ".join(d["cli_extras"]) or "none"),
        ("idle RSS (no model)", f"{r['idle_rss_mb']:.1f} MiB"),
        ("model weights (model.onnx*)", f"{r['model_weights_mb']:.1f} MiB"),
        ("loaded RSS (ready line)", f"{r['loaded_rss_mb']:.1f} MiB"),
        ("after one request", f"{r['after_one_mb']:.1f} MiB"),
        (f"burst of {d['burst']}: peak", f"{d['burst_peak_mb']:.1f} MiB"),
        ("after the burst + 10 s idle", f"{r['after_burst_mb']:.1f} MiB"),
        (
            "KV cache per token / at the model's full context",
            f"{d['kv_bytes_per_token'] / 1024:.1f} KiB / {d['kv_full_context_mb']:.0f} MiB",
        ),
        (
            f"cold start to first token, median of {len(d['cold_starts_ms'])} (noisy)",
            f"{r['cold_start_first_token_ms']} ms {d['cold_starts_ms']}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("largest distributions:", ", ".join(f"{n} {s:.1f}" for n, s in d["top"][:10]))
    imports = d["idle_imports"]
    top = sorted(imports["packages"], key=lambda p: -p[1])[:14]
    print(
        f"idle agent's imports (VmRSS each package's modules add, MiB; Python at start {imports['start_mb']:.1f}, "
        f"{d['idle_measured_rss_mb']:.1f} once serving):",
        ", ".join(f"{name} {mb:.1f}" for name, mb, _n in top),
    )
    if d.get("agent_log_head"):
        print("agent:", *d["agent_log_head"], sep="\n  ")


if __name__ == "__main__":
    main()
