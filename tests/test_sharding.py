"""SPMD over several devices gives the single-device answers: the all-position logits (1e-5
relative) and greedy tokens (identical) of three dense families that cover the sharding cases
(llama, qwen3, gemma3) under tp=2, tp=4 and dp=2,tp=2, and of the hybrid and MoE families on
the meshes their tests name; the engine on a 4-device mesh; two `jax.distributed` processes on
loopback; and `tsjax serve` as a two-process job (process 0 serves HTTP, process 1 follows its
steps).

The pytest process already has JAX on one CPU device, and the device count is fixed when JAX
starts, so the multi-device runs happen in subprocesses that run this very file as a script
with XLA_FLAGS=--xla_force_host_platform_device_count=N. The single-device references are
computed here, in the pytest process, while the subprocess runs (2 CPU cores: overlap them).

Tiny specs are chosen so tp=4 means something: 4 or 8 query heads per layer, and KV heads
fewer than 4 (replicated under tp=4, split under tp=2) in all but qwen3 (4 KV heads: split).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import ATTENTION_ORDER_TOL, all_logits  # noqa: E402
from gguf_factory import write_tiny_gguf  # noqa: E402
from live_server import free_port  # noqa: E402

# family -> tiny-spec overrides (heads chosen for tp=4; see the module docstring)
FAMILIES: dict[str, dict] = {
    # three families cover the cases (KV heads split under tp=2 only, under both, never; q/k
    # norms; sliding windows): the other dense families share their layers and rules
    "llama": dict(n_heads=8, n_kv_heads=2),
    "qwen3": dict(n_heads=8, n_kv_heads=4),
    "gemma3": dict(n_heads=4, n_kv_heads=1),
}
MESHES = {"tp=2": 2, "tp=4": 4, "dp=2,tp=2": 4}  # spec -> devices it uses
MESHES_TP = {"tp=2": 2, "tp=4": 4, "dp=2,tp=2": 2}  # spec -> its tp size
PROMPTS = ([1, 5, 9, 42, 17, 3, 99, 23, 64, 7], [2, 7, 1, 8, 2, 8])
ROWS = (3, 0)  # prompt i goes to cache row ROWS[i]: row 3 lives in the second dp shard
N_TOKENS = 8
ENGINE_PROMPTS = ([1, 5, 9, 42, 17, 3], [4, 4, 8, 15, 16, 23, 42])


def _shapes():
    from tsjax.shapes import StepShapes

    # One bucket each for prefill, attention and decode: three compiles per run.
    return StepShapes.default(rows=4, max_len=32, min_prefill=16, min_attn=32)


def run_case(path: Path, mesh) -> tuple[dict, object]:
    """All-position logits of PROMPTS[0] and N_TOKENS greedy tokens for both prompts, decoded
    together (prefill batch 2 into rows 3 and 0, then full-batch decode steps); and the model."""
    import jax.numpy as jnp

    from tsjax.model import load
    from tsjax.sampling import SamplingParams

    m = load(path, progress=False, shapes=_shapes(), mesh=mesh, quant="f32")
    st = m.steps
    ids = PROMPTS[0]
    logits = st.forward_fn(
        m.params, st.new_cache(), jnp.asarray([ids]), jnp.zeros((1,), jnp.int32), attn_len=32
    )
    cache, sampler = st.new_cache(), st.new_sampler()
    greedy = SamplingParams.greedy()
    first, _, cache, sampler = st.prefill(
        m.params, cache, sampler, list(PROMPTS), list(ROWS), [greedy, greedy]
    )
    out, _, cache, sampler = st.decode(
        m.params,
        cache,
        sampler,
        list(ROWS),
        [int(t) for t in first],
        max(len(p) for p in PROMPTS),
        N_TOKENS - 1,
    )
    tokens = [[int(first[i])] + [int(t) for t in out[:, i]] for i in range(len(PROMPTS))]
    return {"logits": np.asarray(logits[0]).tolist(), "tokens": tokens}, m


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _spawn(
    args: list[str], devices: int, extra_env: dict | None = None, script: list[str] | None = None
) -> subprocess.Popen:
    """Run this file (or `script`, e.g. ["-m", "tsjax.cli"]) with `args` on `devices` CPUs."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        TOKENIZERS_PARALLELISM="false",
        **(extra_env or {}),
    )
    return subprocess.Popen(
        [sys.executable, *(script or [__file__]), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -9, out, err + f"\n(timed out after {timeout}s)"
    return proc.returncode, out, err


# -- multi-device runs of every family --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sharding")
    return {a: write_tiny_gguf(d / f"{a}.gguf", a, **over) for a, over in FAMILIES.items()}


@pytest.fixture(scope="module")
def single_device(tiny_files):
    """arch -> the single-device run, computed on first use (several tests share it)."""
    done: dict[str, dict] = {}

    def ref(arch: str) -> dict:
        if arch not in done:
            done[arch] = run_case(tiny_files[arch], None)[0]
        return done[arch]

    return ref


@pytest.fixture(scope="module")
def family_runs(tiny_files, single_device, tmp_path_factory):
    """(single-device references, multi-device results), computed concurrently: compiling
    dominates, and XLA compiles on one core, so two workers and this process share the cores."""
    d = tmp_path_factory.mktemp("sharding-out")
    archs = list(tiny_files)
    halves = [archs[0::2], archs[1::2]]
    t0 = time.perf_counter()
    procs = [
        _spawn(
            ["families", json.dumps({a: str(tiny_files[a]) for a in h}), str(d / f"{i}.json")], 4
        )
        for i, h in enumerate(halves)
    ]
    refs = {a: single_device(a) for a in tiny_files}
    got: dict = {}
    for i, proc in enumerate(procs):
        rc, stdout, stderr = _finish(proc, 600)
        assert rc == 0, f"multi-device worker failed ({rc}):\n{stdout}\n{stderr[-4000:]}"
        print(f"families worker {i}: {time.perf_counter() - t0:.1f}s\n{stdout}")
        got.update(json.loads((d / f"{i}.json").read_text()))
    return refs, got


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_matches_single_device(family_runs, arch, mesh):
    refs, got = family_runs
    ref, res = refs[arch], got[arch][mesh]
    assert _rel_err(res["logits"], ref["logits"]) < ATTENTION_ORDER_TOL
    assert res["tokens"] == ref["tokens"]
    # What was actually split, so a rule that silently replicates everything cannot pass.
    assert "tp" in res["q_spec"]
    kv_split = FAMILIES[arch]["n_kv_heads"] % MESHES_TP[mesh] == 0
    assert ("tp" in res["k_spec"]) == kv_split
    assert ("dp" in res["cache_spec"]) == ("dp" in mesh)
    assert res["max_param_bytes_per_device"] < res["param_bytes"]


def _families_worker(files: dict[str, str], out: str) -> None:
    import jax

    from tsjax.sharding import bytes_per_device, make_mesh

    results: dict = {}
    for arch, path in files.items():
        results[arch] = {}
        for spec, n in MESHES.items():
            t0 = time.perf_counter()
            mesh = make_mesh(spec, jax.devices()[:n])
            res, m = run_case(Path(path), mesh)
            per_dev = bytes_per_device(m.params)
            layer = m.params.get("layers") or m.params["layers_0"]  # stacked or unrolled
            res.update(
                q_spec=str(layer["attn"]["q"]["weight"].sharding.spec),
                k_spec=str(layer["attn"]["k"]["weight"].sharding.spec),
                # stacked cache, or the blocked one's largest row block (a dp multiple)
                cache_spec=str(jax.tree.leaves(m.steps.new_cache().layers)[-1].sharding.spec),
                param_bytes=int(sum(x.nbytes for x in jax.tree.leaves(m.params))),
                max_param_bytes_per_device=max(per_dev.values()),
            )
            results[arch][spec] = res
            print(f"{arch} {spec}: {time.perf_counter() - t0:.1f}s", flush=True)
    Path(out).write_text(json.dumps(results))


# -- the hybrid recurrent families (Qwen 3.5, Nemotron-H) -------------------------------------

HYBRID = {"qwen35": "deltanet", "nemotron_h": "mamba2"}  # factory model -> its recurrent mixer


def test_hybrid_families_match_single_device():
    """Gated DeltaNet and Mamba2 hybrids (the factory's tiny qwen35 and nemotron_h: recurrent,
    attention and FFN layers in one stack) under tp=2 and dp=2,tp=2: the recurrent heads and
    states split over tp, the states' rows over dp; logits and greedy tokens (two prompts
    prefilled together into rows 3 and 0, then decoded) as on one device."""
    from hf_factory import build

    files = {n: str(build(n).gguf["f32"]) for n in HYBRID}
    proc = _spawn(["hybrid", json.dumps(files)], 4)
    refs = {n: run_case(Path(f), None)[0] for n, f in files.items()}
    rc, stdout, stderr = _finish(proc, 600)
    assert rc == 0, f"multi-device worker failed ({rc}):\n{stdout}\n{stderr[-4000:]}"
    got = json.loads(stdout.strip().splitlines()[-1])
    for name, ref in refs.items():
        for spec, res in got[name].items():
            assert _rel_err(res["logits"], ref["logits"]) < ATTENTION_ORDER_TOL, (name, spec)
            assert res["tokens"] == ref["tokens"], (name, spec)
            assert "tp" in res["mixer_spec"] and "tp" in res["state_spec"], (name, spec, res)
            assert ("dp" in res["state_spec"]) == ("dp" in spec), (name, spec, res)


def _hybrid_worker(files: dict[str, str]) -> None:
    import jax

    from tsjax.cache.recurrent import RecurrentState
    from tsjax.sharding import make_mesh

    out: dict = {}
    for name, path in files.items():
        out[name] = {}
        for spec in ("tp=2", "dp=2,tp=2"):
            res, m = run_case(Path(path), make_mesh(spec, jax.devices()[: MESHES[spec]]))
            mixer = m.params["layers_0"][HYBRID[name]]
            heads = mixer["alpha" if name == "qwen35" else "dt_bias"]
            state = next(x for x in m.steps.new_cache().layers if isinstance(x, RecurrentState))
            res.update(
                mixer_spec=str(jax.tree.leaves(heads)[0].sharding.spec),
                state_spec=str(state.ssm.sharding.spec),
            )
            out[name][spec] = res
    print(json.dumps(out))


# -- GPT-OSS (experts split over tp) and Mistral 3 ---------------------------------------------

# family -> (file, meshes): GPT-OSS's 8 experts split 2 per device under tp=4 and 4 under
# dp=2,tp=2 (rows split over dp too); Mistral 3's temperature by position on split rows.
HF_CASES = {"gpt_oss": ("mxfp4", ("tp=4", "dp=2,tp=2")), "mistral3": ("f32", ("dp=2,tp=2",))}


def test_moe_families_match_single_device(tmp_path):
    """GPT-OSS with its experts split over `tp` (`tsjax.layers.moe.ExpertParallel`) and
    Mistral 3 give the single-device logits (1e-5) and greedy tokens (identical)."""
    from hf_factory import build_all

    models = build_all(list(HF_CASES))
    files = {n: str(models[n].gguf[f]) for n, (f, _) in HF_CASES.items()}
    proc = _spawn(["hf", json.dumps(files), str(tmp_path / "hf.json")], 4)
    refs = {n: run_case(Path(f), None)[0] for n, f in files.items()}
    rc, stdout, stderr = _finish(proc, 900)
    assert rc == 0, f"multi-device worker failed ({rc}):\n{stdout}\n{stderr[-4000:]}"
    got = json.loads((tmp_path / "hf.json").read_text())
    for name, (_, meshes) in HF_CASES.items():
        for mesh in meshes:
            res = got[name][mesh]
            assert _rel_err(res["logits"], refs[name]["logits"]) < ATTENTION_ORDER_TOL, (
                name,
                mesh,
            )
            assert res["tokens"] == refs[name]["tokens"], (name, mesh)
            assert res["max_param_bytes_per_device"] < res["param_bytes"]
    for mesh in HF_CASES["gpt_oss"][1]:
        assert "('tp'" in got["gpt_oss"][mesh]["expert_spec"]  # experts first axis split


def _hf_worker(files: dict[str, str], out: str) -> None:
    import jax

    from tsjax.sharding import bytes_per_device, make_mesh

    results: dict = {}
    for name, path in files.items():
        results[name] = {}
        for spec in HF_CASES[name][1]:
            t0 = time.perf_counter()
            res, m = run_case(Path(path), make_mesh(spec, jax.devices()[:4]))
            layer = m.params.get("layers") or m.params["layers_0"]
            if "moe" in layer:
                res["expert_spec"] = str(layer["moe"]["up"]["weight"].sharding.spec)
            res.update(
                param_bytes=int(sum(x.nbytes for x in jax.tree.leaves(m.params))),
                max_param_bytes_per_device=max(bytes_per_device(m.params).values()),
            )
            results[name][spec] = res
            print(f"{name} {spec}: {time.perf_counter() - t0:.1f}s", flush=True)
    Path(out).write_text(json.dumps(results))


# -- swapping cache rows on a mesh ------------------------------------------------------------


def test_swap_rows_on_a_mesh(tiny_files):
    """The engine's row exchange (`Steps.swap_rows`) on a dp=2,tp=2 mesh of the blocked cache:
    the swapped rows continue exactly as unswapped rows do on one device."""
    rc, out, err = _finish(_spawn(["swap", str(tiny_files["llama"])], 4), 300)
    assert rc == 0, f"swap worker failed ({rc}):\n{out}\n{err[-4000:]}"
    got = json.loads(out.strip().splitlines()[-1])
    assert got["mesh"] == got["single"]


def _swap_worker(path: str) -> None:
    from tsjax.model import load
    from tsjax.sampling import SamplingParams
    from tsjax.shapes import StepShapes

    greedy = SamplingParams.greedy()

    def run(mesh: str | None, swap: bool) -> list[list[int]]:
        # split_span=8 and skipping from 1 row: the span 16-31 is two blocks, and decode's
        # skip of an upper half no row reaches (a cond on a dp-sharded row block's furthest
        # row) runs on the mesh too; row blocks of 4
        shapes = replace(
            StepShapes.default(8, 64, min_prefill=8, min_attn=16, min_row_block=4),
            split_span=8,
            skip_min_rows=1,
        )
        m = load(Path(path), progress=False, shapes=shapes, mesh=mesh, quant="f32")
        s = m.steps
        assert s.blocks == ((4, 8), (16, 24, 32, 48, 64))
        cache, sampler = s.new_cache(), s.new_sampler()
        prompts, rows = [list(range(3, 23)), list(range(40, 58))], [1, 6]
        first, _, cache, sampler = s.prefill(m.params, cache, sampler, prompts, rows, [greedy] * 2)
        if swap:
            _, _, cache, sampler = s.swap_rows(m.params, cache, sampler, [(1, 6)])
            rows = [6, 1]
        tokens, out = [int(t) for t in first], []
        for i in range(5):
            got, _, cache, sampler = s.decode(m.params, cache, sampler, rows, tokens, 20 + i, 1)
            tokens = [int(t) for t in got[0]]
            out.append(tokens)
        return out

    print(json.dumps({"single": run(None, False), "mesh": run("dp=2,tp=2", True)}))


def test_narrow_weights_on_a_mesh(tiny_files):
    """bf16 and int8 weights on a dp=2,tp=2 mesh follow the same weights on one device: the
    same greedy tokens and logits within float32 rounding (the tied output projection's
    bf16 / int8 copy is sharded like any `lm_head`). int8 quantizes every projection's input
    row to 127 levels, so a last-bit difference between the two programs upstream can move
    an input by one level, 1/127 of its row's largest value: logits within 2e-2 there
    (measured 7e-3 since the rotary tables became a lookup; bf16 still agrees exactly)."""
    rc, out, err = _finish(_spawn(["narrow", str(tiny_files["llama"])], 4), 300)
    assert rc == 0, f"narrow worker failed ({rc}):\n{out}\n{err[-4000:]}"
    got = json.loads(out.strip().splitlines()[-1])
    for quant in ("bf16", "int8"):
        single, mesh = got[quant]["single"], got[quant]["mesh"]
        assert mesh["tokens"] == single["tokens"], quant
        tol = 2e-2 if quant == "int8" else 1e-3
        assert _rel_err(mesh["logits"], single["logits"]) < tol, quant


def _narrow_worker(path: str) -> None:
    from tsjax.generation import generate
    from tsjax.model import load
    from tsjax.sampling import SamplingParams

    prompt = [3, 17, 29, 41, 5, 60, 7]

    def run(quant: str, mesh: str | None) -> dict:
        m = load(Path(path), max_len=64, rows=4, progress=False, quant=quant, mesh=mesh)
        res = generate(m, prompt, sampling=SamplingParams.greedy(), max_tokens=6)
        logits = all_logits(m, prompt)
        return {"tokens": [int(t) for t in res.tokens], "logits": np.asarray(logits).tolist()}

    out = {q: {"single": run(q, None), "mesh": run(q, "dp=2,tp=2")} for q in ("bf16", "int8")}
    print(json.dumps(out))


# -- the engine on a 4-device mesh ------------------------------------------------------------


def _engine_requests():
    from serve.engine import GenerationRequest
    from tsjax.sampling import SamplingParams

    return [
        GenerationRequest(list(p), SamplingParams.greedy(), max_tokens=N_TOKENS, reuse_prefix=False)
        for p in ENGINE_PROMPTS
    ]


def _engine_worker(path: str, out: str) -> None:
    from serve.engine import Engine, EventKind
    from tsjax.model import load
    from tsjax.shapes import StepShapes

    shapes = StepShapes.default(rows=4, max_len=64, min_prefill=16, min_attn=32)
    model = load(Path(path), progress=False, shapes=shapes, mesh="dp=2,tp=2", quant="f32")
    eng = Engine(model, decode_steps=4, prefill_chunk=16)
    eng.start()

    async def one(req):
        return [ev async for ev in eng.generate(req)]

    async def main():
        return await asyncio.gather(*(one(r) for r in _engine_requests()))

    try:
        results = asyncio.run(main())
    finally:
        eng.stop()
    Path(out).write_text(
        json.dumps(
            [
                {
                    "text": "".join(e.text for e in evs if e.kind is EventKind.TOKEN),
                    "kind": str(evs[-1].kind),
                    "completion_tokens": evs[-1].stats.completion_tokens,
                    "devices": int(model.steps.mesh.devices.size),
                }
                for evs in results
            ]
        )
    )


def test_engine_on_four_devices(tiny_files, tmp_path):
    from tsjax.generation import generate
    from tsjax.model import load
    from tsjax.sampling import SamplingParams
    from tsjax.shapes import StepShapes

    out = tmp_path / "engine.json"
    proc = _spawn(["engine", str(tiny_files["llama"]), str(out)], 4)
    shapes = StepShapes.default(rows=4, max_len=64, min_prefill=16, min_attn=32)
    model = load(tiny_files["llama"], progress=False, shapes=shapes, quant="f32")
    want = [
        generate(model, list(p), sampling=SamplingParams.greedy(), max_tokens=N_TOKENS)
        for p in ENGINE_PROMPTS
    ]
    rc, stdout, stderr = _finish(proc, 300)
    assert rc == 0, f"engine worker failed ({rc}):\n{stdout}\n{stderr[-4000:]}"
    got = json.loads(out.read_text())
    for g, w in zip(got, want, strict=True):
        assert g["kind"] == "done" and g["devices"] == 4
        assert g["text"] == w.text
        assert g["completion_tokens"] == len(w.tokens)


# -- two processes with jax.distributed ------------------------------------------------------


def _distributed_worker(coordinator: str, process_id: int, path: str, out: str) -> None:
    from tsjax.sharding import initialize_distributed

    initialize_distributed(coordinator, num_processes=2, process_id=process_id)
    import jax

    assert jax.device_count() == 4 and jax.local_device_count() == 2
    res = {spec: run_case(Path(path), spec)[0] for spec in ("tp=4", "dp=2,tp=2")}
    Path(out).write_text(json.dumps(res))
    jax.distributed.shutdown()


def test_two_processes_jax_distributed(tiny_files, single_device, tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    path = str(tiny_files["llama"])
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [_spawn(["distributed", coordinator, str(i), path, str(outs[i])], 2) for i in range(2)]
    ref = single_device("llama")
    done = [_finish(p, 300) for p in procs]
    for rc, stdout, stderr in done:
        if rc != 0:
            unsupported = [
                ln
                for ln in stderr.splitlines()
                if "collective" in ln.lower() and ("not" in ln.lower() or "unimpl" in ln.lower())
            ]
            if unsupported:
                pytest.skip(f"CPU collectives across processes unsupported: {unsupported[-1]}")
            raise AssertionError(f"distributed worker failed ({rc}):\n{stdout}\n{stderr[-4000:]}")
    for o in outs:
        res = json.loads(o.read_text())
        for spec, r in res.items():
            assert r["tokens"] == ref["tokens"], spec
            assert _rel_err(r["logits"], ref["logits"]) < ATTENTION_ORDER_TOL, spec


# -- `tsjax serve` over two processes ---------------------------------------------------------

# Small shapes: one prefill bucket (16), one attention bucket (64), decode buckets 1 and 4.
SERVE_FLAGS = ["--rows", "4", "--max-len", "64", "--prefill-chunk", "16", "--decode-steps", "4"]
# (prompt, tokens): different lengths, so one stream ends while the other decodes on
SERVE_REQUESTS = (("hello world, here we go", 12), ("the quick brown fox", 7))


def _generate_body(prompt: str, n: int) -> dict:
    """Greedy, the raw prompt (no chat template), exactly `n` tokens (the model is the
    fixture's llama.gguf)."""
    options = {"temperature": 0, "num_predict": n, "seed": 0}
    return {"model": "llama", "prompt": prompt, "raw": True, "stream": False, "options": options}


def _serve_requests(url: str) -> list[dict]:
    """SERVE_REQUESTS sent at once to /api/generate (greedy, raw prompts, fixed lengths)."""
    import httpx

    def one(prompt_n: tuple[str, int]) -> dict:
        prompt, n = prompt_n
        body = _generate_body(prompt, n)
        r = httpx.post(url + "/api/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = r.json()
        return {k: got[k] for k in ("response", "eval_count", "done_reason")}

    with ThreadPoolExecutor(len(SERVE_REQUESTS)) as pool:
        return list(pool.map(one, SERVE_REQUESTS))


def _wait_healthy(url: str, procs: list[subprocess.Popen], timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, f"a server process exited early ({p.returncode})"
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return
            assert r.json()["status"] == "loading", r.text
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the two-process server did not become healthy")


def _single_process_serve(path: Path) -> list[dict]:
    """The same requests against the in-process app on this process's one device."""
    from litestar.testing import TestClient

    from serve.app import create_app
    from serve.settings import load_settings

    flags = dict(zip(SERVE_FLAGS[0::2], SERVE_FLAGS[1::2], strict=True))
    over = {k.lstrip("-").replace("-", "_"): int(v) for k, v in flags.items()}
    settings = load_settings(None, dict(model=str(path), quant="f32", **over))
    with TestClient(create_app(settings), timeout=120, base_url="http://127.0.0.1") as client:
        deadline = time.time() + 300
        while client.get("/health").status_code != 200:
            assert time.time() < deadline, client.get("/health").text
            time.sleep(0.2)
        got = []
        for prompt, n in SERVE_REQUESTS:
            body = _generate_body(prompt, n)
            r = client.post("/api/generate", json=body)
            assert r.status_code == 200, r.text
            got.append({k: r.json()[k] for k in ("response", "eval_count", "done_reason")})
    return got


def _serve_argv(coordinator: str, process_id: int, path: str, port: int) -> list[str]:
    flags = {
        "--model": path,
        "--mesh": "dp=2,tp=2",
        "--coordinator-address": coordinator,
        "--num-processes": "2",
        "--process-id": str(process_id),
        "--host": "127.0.0.1",
        "--port": str(port),
        "--quant": "f32",
    }
    return ["serve", *(x for kv in flags.items() for x in kv), *SERVE_FLAGS]


def test_serve_two_processes(tiny_files):
    """`tsjax serve` as a two-process jax.distributed job (2 CPU devices each, dp=2,tp=2 over
    all 4): process 0 serves HTTP and the follower runs every step in lockstep. Concurrent
    greedy requests give the single-process answers, and SIGTERM to process 0 ends both."""
    coordinator, port = f"127.0.0.1:{free_port()}", free_port()
    path = str(tiny_files["llama"])
    t0 = time.perf_counter()
    procs = [
        _spawn(_serve_argv(coordinator, i, path, port), 2, script=["-m", "tsjax.cli"])
        for i in range(2)
    ]
    try:
        want = _single_process_serve(tiny_files["llama"])  # overlaps the workers' compiles
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, procs, 300)
        t_ready = time.perf_counter() - t0
        got = _serve_requests(url)
        got_again = _serve_requests(url)  # rows were freed and reused
        procs[0].send_signal(signal.SIGTERM)
        done = [_finish(p, 120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"two-process serve: healthy after {t_ready:.1f}s, {time.perf_counter() - t0:.1f}s")
    (rc0, _, err0), (rc1, _, err1) = done
    logs = f"process 0:\n{err0[-3000:]}\nprocess 1:\n{err1[-3000:]}"
    assert rc0 in (0, -signal.SIGTERM), logs
    assert rc1 == 0, logs
    assert "follower 1 of 2" in err1 and "shutdown after" in err1, logs
    assert "in 2 processes" in err0 and "mesh (dp=2, tp=2) over 4 devices in 2" in err0, logs
    assert got == want and got_again == want, logs
    assert all(g["eval_count"] == n for g, (_, n) in zip(got, SERVE_REQUESTS, strict=True))


# -- pure functions (no devices needed beyond the one we have) --------------------------------


def test_parse_mesh():
    from tsjax.sharding import parse_mesh

    assert parse_mesh("dp=2,tp=2") == {"dp": 2, "tp": 2}
    assert parse_mesh(" tp = 4 ") == {"tp": 4}
    assert parse_mesh("tp=-1") == {"tp": -1}
    assert parse_mesh("") == {} and parse_mesh(None) == {}
    for bad in ("tp", "xp=2", "tp=0", "tp=2,tp=2", "dp=-1,tp=-1"):
        with pytest.raises(ValueError):
            parse_mesh(bad)


def test_make_mesh_on_one_device():
    import jax

    from tsjax.sharding import make_mesh

    assert dict(make_mesh("tp=1").shape) == {"dp": 1, "tp": 1}
    assert dict(make_mesh("tp=-1").shape) == {"dp": 1, "tp": jax.device_count()}
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh("dp=2,tp=2")


def test_rules_replicate_what_does_not_divide():
    from jax.sharding import PartitionSpec as P

    from tsjax.sharding import CACHE_KV_AXES, logical_to_spec, param_axes

    class FakeMesh:
        shape = {"dp": 2, "tp": 4}

    sizes = {"q_heads": 8, "kv_heads": 2, "ffw": 128, "vocab": 384, "batch": 4, "embed": 64}
    spec = lambda axes: logical_to_spec(axes, FakeMesh(), sizes)  # noqa: E731
    assert spec(param_axes(("layers", "attn", "q", "kernel"))) == P(None, None, "tp")
    assert spec(param_axes(("layers", "attn", "k", "kernel"))) == P()  # 2 KV heads, tp=4
    assert spec(param_axes(("layers", "attn", "o", "kernel"))) == P(None, "tp")
    assert spec(param_axes(("layers", "mlp", "down", "kernel"))) == P(None, "tp")
    assert spec(param_axes(("layers_7", "attn", "q", "kernel"))) == P(None, "tp")  # unrolled
    assert spec(param_axes(("layers_7", "attn", "q", "kernel_scale"))) == P("tp")  # int8
    assert spec(param_axes(("layers", "mlp", "down", "kernel_scale"))) == P()
    assert spec(param_axes(("embed", "embedding"))) == P("tp")
    assert spec(CACHE_KV_AXES) == P(None, "dp")
    with pytest.raises(KeyError):
        param_axes(("layers", "nope", "kernel"))


def main(argv: list[str]) -> None:
    """Subprocess entry points (see the tests above)."""
    kind, *args = argv
    if kind == "families":
        _families_worker(json.loads(args[0]), args[1])
    elif kind == "engine":
        _engine_worker(*args)
    elif kind == "hybrid":
        _hybrid_worker(json.loads(args[0]))
    elif kind == "hf":
        _hf_worker(json.loads(args[0]), args[1])
    elif kind == "swap":
        _swap_worker(args[0])
    elif kind == "narrow":
        _narrow_worker(args[0])
    elif kind == "distributed":
        _distributed_worker(args[0], int(args[1]), args[2], args[3])
    else:
        raise SystemExit(f"unknown worker {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
