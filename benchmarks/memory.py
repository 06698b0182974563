"""Co-located memory: the whole ``dynft run`` process tree against one bare process.

dynft's figure is the resident memory of every process of a real ``dynft run`` (supervisor,
fork server, trainer, server, multiprocessing's helpers) on the demo stream, each physical page
counted once however many of them map it (frame numbers from ``/proc/<pid>/pagemap``), read once
the server answers with a trained version and has served predictions for a while. The baseline
is one bare process that loads the same model with transformers, wraps it with a LoRA adapter
with peft and predicts, measured the same way in the same run. Where the kernel hides frame
numbers (they need CAP_SYS_ADMIN), both are the sum of PSS instead (``smaps_rollup``), which
also divides a page with processes outside the tree, such as this harness, which imported torch:
it favours the single bare process. The PSS figures are reported beside in any case. On CUDA a
second row compares the GPU memory each device holds (``nvidia-smi``'s per-process figures,
summed over the tree).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import Result, in_fresh_process, progress, rounded, skipped
from benchmarks.plans import Plan

NAME = "co-located memory, CPU"
GPU_NAME = "co-located memory, GPU"
TEXTS = ["my card has not arrived yet", "how do I top up by bank transfer", "I was charged twice"]
CHUNK = 1 << 16  # pagemap entries read at a time (512 KiB)
STARTED = re.compile(r"started (\w+) \(pid (\d+)\)")


def pss_mib(pid: int | str = "self") -> float:
    """Proportional set size of one process, in MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0.0


def distinct_mib(pids: list[int]) -> float | None:
    """Resident memory of ``pids`` together, each physical page counted once, in MiB.

    Read from ``/proc/<pid>/pagemap``: the frame number of every resident page, unioned over the
    processes. Unlike a sum of PSS, this does not depend on who else maps the same pages: PSS
    charges a page that the harness (which imported torch) also maps half to a bare process
    but three quarters to a tree of three. None where the kernel hides frame numbers (they
    need CAP_SYS_ADMIN); a process that is gone counts nothing.
    """
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    frames = []
    for pid in pids:
        try:
            frames += list(_resident_frames(pid, page))
        except (FileNotFoundError, ProcessLookupError, EOFError):
            continue  # gone while read (a short-lived helper): it holds nothing now, as pss_mib says 0
        except PermissionError:
            return None
    resident = np.unique(np.concatenate(frames)) if frames else np.zeros(0, np.uint64)
    if resident.size and not resident.any():  # every frame number reads 0: hidden from this user
        return None
    return float(resident.size * page / 2**20)


def _resident_frames(pid: int, page: int) -> Iterator[Any]:
    """The frame numbers of ``pid``'s resident pages, region by region, read in bounded chunks (a
    region may be GiBs); ``EOFError`` when a read comes back short (the process is going)."""
    import numpy as np

    present, frame_bits = np.uint64(1 << 63), np.uint64((1 << 55) - 1)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) // page for x in span.split("-"))
            if perms.startswith("---") or start >= (1 << 63) // page:  # reserved address space; vsyscall
                continue
            for first in range(start, end, CHUNK):
                want = min(CHUNK, end - first) * 8
                pagemap.seek(first * 8)
                data = pagemap.read(want)
                if len(data) != want:
                    raise EOFError(f"pagemap of {pid} ends early")
                entries = np.frombuffer(data, dtype=np.uint64)
                yield entries[(entries & present) != 0] & frame_bits


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from the parent pids in ``/proc``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the command name
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def roles(root: int, log: str) -> dict[int, str]:
    """Each process of a ``dynft run`` tree by role: the supervisor's log names its children."""
    named = {int(pid): name for name, pid in STARTED.findall(log)}
    out: dict[int, str] = {}
    for pid in descendants(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pid == root:
            out[pid] = "supervisor"
        elif pid in named:
            out[pid] = named[pid]
        elif "forkserver" in cmdline:
            out[pid] = "fork server"
        elif "resource_tracker" in cmdline:
            out[pid] = "resource tracker"
        else:
            out[pid] = "other"
    return out


def gpu_mib(pids: list[int]) -> dict[str, float]:
    """GPU memory held by these processes, per device (empty without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    query = ["nvidia-smi", "--query-compute-apps=gpu_bus_id,pid,used_gpu_memory", "--format=csv,noheader,nounits"]
    out: dict[str, float] = {}
    for line in subprocess.run(query, capture_output=True, text=True, check=False).stdout.splitlines():
        bus, pid, used = (part.strip() for part in line.split(","))
        if int(pid) in pids and used.isdigit():
            out[bus] = out.get(bus, 0.0) + float(used)
    return out


def bare_process(model_path: str, device: str, seconds: float) -> dict[str, Any]:
    """One process: transformers + peft, a LoRA adapter, predictions for ``seconds``; its own PSS."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(1)  # as the co-located server
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=8)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["query", "value"])).to(device).eval()
    deadline, batches = time.monotonic() + seconds, 0
    with torch.inference_mode():
        while time.monotonic() < deadline:
            batch = tokenizer(TEXTS, padding=True, return_tensors="pt").to(device)
            model(**batch).logits.argmax(-1).tolist()
            batches += 1
    pid = os.getpid()
    return {"pss_mib": pss_mib(), "distinct_mib": distinct_mib([pid]), "gpu_mib": gpu_mib([pid]), "batches": batches}


def dynft_tree(model_path: str, device: str, workdir: Path, seconds: float, timeout_s: float) -> dict[str, Any]:
    """A real ``dynft run`` on the demo stream: PSS by process once it serves a trained version."""
    import httpx

    port = _free_port()
    log_path = workdir / "run.log"
    cmd = [sys.executable, "-m", "dynft", "run", "--source", "demo", "--model", model_path]
    cmd += ["--port", str(port), "--state-dir", str(workdir / "state"), "--set", f"model.device={device}"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            served_at = _wait_served(client, proc, log_path, timeout_s)
            deadline, requests = time.monotonic() + seconds, 0
            while time.monotonic() < deadline:
                client.post("/v1/predict", json={"texts": TEXTS}).raise_for_status()
                requests += 1
        by_role = roles(proc.pid, log_path.read_text(errors="replace"))
        pss = {pid: pss_mib(pid) for pid in by_role}
        distinct = distinct_mib(list(by_role))
        gpu = gpu_mib(list(by_role))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    per_role: dict[str, float] = {}
    for pid, role in by_role.items():
        per_role[role] = per_role.get(role, 0.0) + pss[pid]
    return {
        "pss_mib": sum(pss.values()),
        "distinct_mib": distinct,
        "by_role": per_role,
        "gpu_mib": gpu,
        "served_after_s": served_at,
    }


def _wait_served(client: Any, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> float:
    """Seconds until the server answers with a trained version; RuntimeError when it never does."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"dynft run exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            answer = client.post("/v1/predict", json={"texts": TEXTS[:1]})
            if answer.is_success and (answer.json().get("adapter_version") or 0) >= 1:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"no trained version served within {timeout_s:.0f} s: {log_path.read_text()[-2000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(plan: Plan) -> list[Result]:
    if plan.suite == "smoke":  # a whole `dynft run`: the smoke suite stays seconds per benchmark
        return [skipped(NAME, "not part of the smoke suite")]
    if not Path("/proc/self/smaps_rollup").exists():
        return [skipped(NAME, "no /proc/<pid>/smaps_rollup (Linux 4.14+) to read PSS from")]
    seconds = 10.0  # of predicting before the reading, in each (the quick suite must stay within 5 minutes)
    progress(f"  memory: bare transformers+peft process predicting for {seconds:.0f} s ...")
    bare = in_fresh_process(plan.isolate, bare_process, plan.model_path, plan.device, seconds)
    progress(f"    bare: {_mib(bare)}; dynft run on the demo stream ...")
    with tempfile.TemporaryDirectory() as tmp:
        ours = dynft_tree(plan.model_path, plan.device, Path(tmp), seconds, timeout_s=600)
    progress(f"    dynft run: {_mib(ours)} (PSS by process: {_shown(ours['by_role'])})")
    distinct = ours["distinct_mib"] is not None and bare["distinct_mib"] is not None
    key = "distinct_mib" if distinct else "pss_mib"
    measure = "resident pages counted once (/proc/<pid>/pagemap)" if distinct else "sum of PSS"
    results = [
        Result(
            name=NAME,
            metric=f"memory of the whole `dynft run` process tree after its first trained version served: {measure}",
            unit="MiB",
            dynft=ours[key],
            baseline=bare[key],
            baseline_name="one bare transformers+peft process predicting",
            higher_is_better=False,
            goal="tree <= 1.6 x the bare process (ratio >= 0.625)",
            met=ours[key] <= 1.6 * bare[key],
            details={
                "PSS, dynft tree / bare (MiB)": [rounded(ours["pss_mib"], 4), rounded(bare["pss_mib"], 4)],
                "PSS ratio": rounded(bare["pss_mib"] / ours["pss_mib"]),
                "by process (MiB PSS)": _shown(ours["by_role"]),
                "first trained version served after": f"{ours['served_after_s']:.0f} s",
                "predicting before the reading": f"{seconds:.0f} s in each",
            },
        )
    ]
    if plan.device == "cuda":
        ours_gpu, bare_gpu = sum(ours["gpu_mib"].values()), sum(bare["gpu_mib"].values())
        results.append(
            Result(
                name=GPU_NAME,
                metric="GPU memory of the process tree (nvidia-smi, per process, summed)",
                unit="MiB",
                dynft=ours_gpu or None,
                baseline=bare_gpu or None,
                baseline_name="one bare transformers+peft process predicting",
                higher_is_better=False,
                goal="base weights resident once",
                details={"per device, dynft": ours["gpu_mib"], "per device, bare": bare["gpu_mib"]},
            )
        )
    return results


def _mib(measured: dict[str, Any]) -> str:
    distinct = measured["distinct_mib"]
    pss = f"{measured['pss_mib']:.0f} MiB PSS"
    return pss if distinct is None else f"{distinct:.0f} MiB resident, each page once; {pss}"


def _shown(by_role: dict[str, float]) -> str:
    return ", ".join(f"{role} {rounded(mib, 3)}" for role, mib in sorted(by_role.items(), key=lambda kv: -kv[1]))
