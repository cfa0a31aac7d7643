"""The backend's native start-up lines are hidden from commands; every other line on stderr is kept, in order."""

import os

import pytest

from transferkit.native_logs import BANNER, is_start_up_noise, start_up_noise_hidden

# as TensorFlow 2.21 writes them on a machine without a GPU
ONEDNN = ("I0000 00:00:1796009996.662704   10188 port.cc:153] oneDNN custom operations are on. You may see slightly "
          "different numerical results due to floating-point round-off errors from different computation orders.")
CUDART = ("I0000 00:00:1796009996.663047   10188 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
          "will not be used.")
CUINIT = ("E0000 00:00:1796010003.943016   10188 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
          "Failed call to cuInit: UNKNOWN ERROR (303)")
OTHER_ERROR = "E0000 00:00:1796010003.943016   10188 op_kernel.cc:1842] OP_REQUIRES failed at conv_ops.cc:12"


def test_noise_is_the_banner_native_info_and_warnings_and_the_cuda_probe_without_a_device():
    assert all(is_start_up_noise(line, nvidia=False) for line in (BANNER, ONEDNN, CUDART, CUINIT))
    assert not is_start_up_noise(CUINIT, nvidia=True)  # with an NVIDIA device, a failed probe is news
    for line in (OTHER_ERROR, "Error: --lr must be > 0.", "Traceback (most recent call last):", "  0%|  | 0/9"):
        assert not is_start_up_noise(line, nvidia=False)


def test_the_block_keeps_other_lines_in_order_and_all_of_them_when_it_fails(capfd):
    probe_hidden = is_start_up_noise(CUINIT)  # whatever device this machine has, the CUDA line follows the rule
    with start_up_noise_hidden():
        os.write(2, f"{BANNER}\n{ONEDNN}\nkept one\n{CUINIT}\nkept two\n".encode())
    expected = ["kept one"] + ([] if probe_hidden else [CUINIT]) + ["kept two"]
    assert capfd.readouterr().err.splitlines() == expected
    with pytest.raises(ImportError), start_up_noise_hidden():
        os.write(2, f"{ONEDNN}\nlibcudnn.so: cannot open shared object file\n".encode())
        raise ImportError("libcudnn")
    assert capfd.readouterr().err.splitlines() == [ONEDNN, "libcudnn.so: cannot open shared object file"]
    with start_up_noise_hidden(enabled=False):
        os.write(2, f"{ONEDNN}\n".encode())
    assert capfd.readouterr().err.splitlines() == [ONEDNN]
