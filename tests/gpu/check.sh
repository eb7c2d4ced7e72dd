#!/usr/bin/env bash
# Checks envelope's GPU figures against nvidia-smi and pynvml on a real GPU machine.
#
# Needs: root, an NVIDIA driver (nvidia-smi), python3 with torch (CUDA) and pynvml
# (nvidia-ml-py), and envelope's release binary built beforehand:
#   cargo build --release            # on the build machine
#   bash tests/gpu/check.sh [path/to/envelope]
# No network is used. Runs in about two minutes (always under 5). Prints a table and exits
# non-zero when a figure disagrees beyond the tolerance below.
#
# Tolerances (why):
#   utilization: 10 percentage points. envelope averages NVML's utilization over its window,
#     nvidia-smi is sampled once a second over the same window; both read the same counter,
#     but not at the same instants.
#   memory used and per-process memory: 2% or 256 MiB, whichever is larger. A steady PyTorch
#     load holds its allocation, so all three readers should see the same bytes.
set -euo pipefail

ENVELOPE=${1:-target/release/envelope}
WINDOW_S=10
WORK=$(mktemp -d)
LOAD_PID=""
cleanup() {
  [ -n "$LOAD_PID" ] && kill "$LOAD_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() { echo "check.sh: $*" >&2; exit 2; }
[ -x "$ENVELOPE" ] || fail "no envelope binary at $ENVELOPE (build it with cargo build --release, or pass its path)"
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: is the NVIDIA driver installed?"
python3 -c 'import torch, pynvml; assert torch.cuda.is_available()' 2>/dev/null \
  || fail "python3 needs torch with CUDA and pynvml (nvidia-ml-py)"

# 1. A steady matrix-multiply load on GPU 0 for longer than the whole check.
cat > "$WORK/load.py" <<'PY'
import time, torch
a = torch.randn(8192, 8192, device="cuda:0")
b = torch.randn(8192, 8192, device="cuda:0")
end = time.time() + 90
while time.time() < end:
    c = a @ b
    torch.cuda.synchronize()
PY
python3 "$WORK/load.py" &
LOAD_PID=$!
sleep 8   # CUDA context up, allocation done, utilization steady

# 2. envelope and the references over the same window.
nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits \
  -l 1 > "$WORK/smi.csv" &
SMI_PID=$!
"$ENVELOPE" diagnose --duration "${WINDOW_S}s" --json > "$WORK/envelope.json"
kill "$SMI_PID" 2>/dev/null || true
python3 - "$LOAD_PID" > "$WORK/pynvml.json" <<'PY'
import json, sys, pynvml
pynvml.nvmlInit()
load_pid = int(sys.argv[1])
out = {"devices": [], "load_process_bytes": None}
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    out["devices"].append({"index": i, "used": mem.used, "total": mem.total})
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
        if p.pid == load_pid:
            out["load_process_bytes"] = p.usedGpuMemory
print(json.dumps(out))
PY

# 3. Compare and print the table.
FIGURES_OK=0
python3 - "$WORK/envelope.json" "$WORK/smi.csv" "$WORK/pynvml.json" "$LOAD_PID" <<'PY' || FIGURES_OK=$?
import json, sys
envelope = json.load(open(sys.argv[1]))
smi_rows = [line.split(",") for line in open(sys.argv[2]) if line.strip()]
reference = json.load(open(sys.argv[3]))
load_pid = int(sys.argv[4])
MIB = 1 << 20

gpu = envelope.get("gpu", {})
if not gpu.get("available"):
    print("envelope saw no GPU:", gpu.get("reason")); sys.exit(1)
device = next(d for d in gpu["devices"] if d["index"] == 0)
smi = [r for r in smi_rows if r[0].strip() == "0"]
smi_util = sum(float(r[1]) for r in smi) / len(smi) / 100.0
smi_used = float(smi[-1][2]) * MIB
py_used = next(d for d in reference["devices"] if d["index"] == 0)["used"]
process = next((p for p in gpu["processes"] if p["pid"] == load_pid), None)

def mem_ok(a, b):
    return a is not None and b is not None and abs(a - b) <= max(0.02 * b, 256 * MIB)

rows = [
    ("GPU 0 utilization", device["utilization"], smi_util, "nvidia-smi mean",
     device["utilization"] is not None and abs(device["utilization"] - smi_util) <= 0.10),
    ("GPU 0 memory used (bytes)", device["memory_used_bytes"], py_used, "pynvml",
     mem_ok(device["memory_used_bytes"], py_used)),
    ("GPU 0 memory used (bytes)", device["memory_used_bytes"], smi_used, "nvidia-smi (MiB)",
     mem_ok(device["memory_used_bytes"], smi_used)),
    ("load process memory (bytes)", process and process["memory_bytes"], reference["load_process_bytes"], "pynvml",
     mem_ok(process and process["memory_bytes"], reference["load_process_bytes"])),
]
print(f"{'figure':<30} {'envelope':>16} {'reference':>16}  {'source':<18} result")
failed = 0
for name, ours, theirs, source, ok in rows:
    failed += not ok
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) and v < 10 else f"{v:.0f}")
    print(f"{name:<30} {fmt(ours):>16} {fmt(theirs):>16}  {source:<18} {'ok' if ok else 'DISAGREE'}")
print(f"GPU 0: {device['name']}, power {device['power_w']} W, temperature {device['temperature_c']} C, "
      f"throttle {device['throttle_reasons']}, SM of load process {process and process['sm_utilization']}")
sys.exit(1 if failed else 0)
PY

# 4. The CUDA uprobes against what a PyTorch program did and its own profiler's counts:
#    copies of known size host to device and back, and timed synchronisations. Bytes: at
#    least the program's (PyTorch may copy more of its own), at most 5% more. Synchronisation
#    time: within 10% of the program's own timing of torch.cuda.synchronize(). Launches are
#    counted too (sync+launch) and compared with the profiler's cudaLaunchKernel count.
kill "$LOAD_PID" 2>/dev/null || true
cat > "$WORK/cuda.py" <<'PY'
import json, sys, time, torch
from torch.profiler import profile, ProfilerActivity
torch.zeros(1, device="cuda:0"); torch.cuda.synchronize()
time.sleep(8)   # envelope rescans maps every 5 s: the libraries are attached by now
host = torch.empty(64 << 20, dtype=torch.uint8).pin_memory()
a = torch.randn(4096, 4096, device="cuda:0")
sync_s = 0.0
# CUDA activity: the runtime API calls (cudaLaunchKernel, cudaDeviceSynchronize) are traced
# through CUPTI, which only that records.
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(20):
        dev = host.to("cuda:0")           # 64 MiB host to device
        back = dev.to("cpu")              # 64 MiB device to host
        for _ in range(10):
            c = a @ a
        start = time.perf_counter(); torch.cuda.synchronize(); sync_s += time.perf_counter() - start
counts = {e.key: e.count for e in prof.key_averages()}
print(json.dumps({"pid": __import__("os").getpid(), "h2d_bytes": 20 * (64 << 20), "d2h_bytes": 20 * (64 << 20),
                  "sync_s": sync_s, "device_syncs": counts.get("cudaDeviceSynchronize", 0),
                  "launches": counts.get("cudaLaunchKernel", 0)}))
sys.stdout.flush()
time.sleep(30)
PY
"$ENVELOPE" diagnose --duration 30s --json --cuda-probes sync+launch > "$WORK/cuda-envelope.json" &
DIAGNOSE_PID=$!
sleep 2
python3 "$WORK/cuda.py" > "$WORK/cuda-program.json" &
LOAD_PID=$!
wait "$DIAGNOSE_PID"
CUDA_OK=0
python3 - "$WORK/cuda-envelope.json" "$WORK/cuda-program.json" <<'PY' || CUDA_OK=$?
import json, sys
envelope = json.load(open(sys.argv[1]))
program = json.loads(open(sys.argv[2]).readline())
row = next((p for p in envelope["gpu"]["processes"] if p["pid"] == program["pid"]), None)
cuda = row and row.get("cuda")
print("CUDA libraries:", [(l["path"], l["functions_attached"], l["problem"]) for l in envelope["cuda_probes"]["libraries"]])
if not cuda:
    print("envelope counted no CUDA calls for the program"); sys.exit(1)
device_sync = next((f for f in cuda["functions"] if f["function"] == "cudaDeviceSynchronize"),
                   {"seconds": None, "calls": 0})
within = lambda ours, theirs, low, high: ours is not None and theirs * low <= ours <= theirs * high
rows = [
    ("host to device (bytes)", cuda["h2d_bytes"], program["h2d_bytes"], within(cuda["h2d_bytes"], program["h2d_bytes"], 1.0, 1.05)),
    ("device to host (bytes)", cuda["d2h_bytes"], program["d2h_bytes"], within(cuda["d2h_bytes"], program["d2h_bytes"], 1.0, 1.05)),
    # torch.cuda.synchronize() is cudaDeviceSynchronize; .to("cpu") synchronises a stream
    # besides, so the program's own timing is compared with that function's time.
    ("cudaDeviceSynchronize (s)", device_sync["seconds"], program["sync_s"], within(device_sync["seconds"], program["sync_s"], 0.9, 1.1)),
    ("cudaDeviceSynchronize calls", device_sync["calls"], program["device_syncs"], device_sync["calls"] >= program["device_syncs"] >= 20),
    # envelope's window also holds the program's start (a few launches of its own).
    ("kernel launches", cuda["launches"], program["launches"],
     cuda["launches"] is not None and program["launches"] <= cuda["launches"] <= program["launches"] + 50),
    # .to("cuda") and .to("cpu") are an asynchronous copy and a synchronisation: the waits
    # count as copy time, so both directions have some.
    ("blocked on copies to the GPU (s)", cuda["h2d_s"], "> 0", cuda["h2d_s"] > 0),
    ("blocked on copies from the GPU (s)", cuda["d2h_s"], "> 0", cuda["d2h_s"] > 0),
]
failed = 0
for name, ours, theirs, ok in rows:
    failed += not ok
    print(f"{name:<30} {ours!s:>16} {theirs!s:>16}  {'ok' if ok else 'DISAGREE'}")
print("functions:", [(f["function"], f["calls"], round(f["seconds"], 4)) for f in cuda["functions"]])
sys.exit(1 if failed else 0)
PY
[ "$FIGURES_OK" -eq 0 ] && [ "$CUDA_OK" -eq 0 ]
