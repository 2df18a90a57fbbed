"""`make demo` runs end to end (tiny sizes) and reports what the README promises."""
import re

from peft_kernels import demo


def test_demo_reports_bits_memory_error_and_timing(capsys):
    assert demo.main(["--layers", "1", "--hidden", "128", "--vocab", "256", "--seq", "16", "--batch", "1",
                      "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    bits = float(re.search(r"([\d.]+) bits per quantized parameter", out).group(1))
    assert 4.0 < bits < 6.0  # small layers: the per-layer code books weigh more than in big ones
    before = int(re.search(r"model before\s+([\d,]+)", out).group(1).replace(",", ""))
    after = int(re.search(r"model after\s+([\d,]+)", out).group(1).replace(",", ""))
    assert after < before
    w_err = float(re.search(r"weights ([\d.]+)", out).group(1))
    assert 0.01 < w_err < 0.2  # NF4 on Gaussian weights: about 0.09
    assert re.search(r"16-bit [\d.]+ ms, 4-bit [\d.]+ ms", out)
