"""Peak host memory of ``load_quantized``, measured in a fresh interpreter.

Usage: ``python tests/_load_peak_rss.py CHECKPOINT WARMUP_CHECKPOINT`` prints one JSON line:
``{"base": bytes, "peak": bytes, "model_bytes": bytes, "hwm_reset": bool}``.

The warm-up load (a tiny checkpoint of the same architecture) pays for imports and lazy
initialisation first, so the measured growth is the load itself. The kernel's peak-RSS mark
(VmHWM) is then reset by writing 5 to /proc/self/clear_refs; where that is not allowed, the
measurement counts from the current RSS against the old mark, which can only overstate growth.
"""
import gc
import json
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(checkpoint: str, warmup: str) -> None:
    from peft_kernels.quant.checkpoint import load_quantized
    from peft_kernels.quant.model import tensor_bytes

    load_quantized(warmup)  # result dropped at once
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _status("VmRSS")
    model = load_quantized(checkpoint)
    peak = _status("VmHWM")
    print(json.dumps({"base": base, "peak": peak, "model_bytes": tensor_bytes(model), "hwm_reset": reset}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
