"""The CLI is composed at the top: the model-side commands import neither Ray nor HTTP; the
console script adds `serve` and `generate --server` on top of the same parser."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app import cli as serving_cli
from standin import cli as model_cli


def test_model_side_cli_imports_no_serving_code() -> None:
    probe = (
        "import sys, standin.cli; "
        "serving = ('ray', 'serve_app', 'httpx', 'fastapi'); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in serving); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_console_script_adds_serve_and_server_options_to_the_model_commands() -> None:
    model = model_cli.build_parser()[0]
    full = serving_cli.build_parser()
    assert model.parse_args(["train", "--recipe", "demo"]).command == "train"
    with pytest.raises(SystemExit):
        model.parse_args(["serve"])
    args = full.parse_args(["generate", "--prompt", "p", "--server", "http://h:1", "--width", "48"])
    assert (args.server, args.width, args.preset) == ("http://h:1", 48, "tiny")
    assert full.parse_args(["serve", "--profile", "gpu"]).profile == "gpu"
    assert full.parse_args(["train", "--recipe", "demo"]).command == "train"


def test_console_script_runs_model_commands_locally(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # No --server: the same local path as `python -m standin.cli` (bad input → exit 2, one line).
    argv = ["generate", "--prompt", "x", "--frames", "10", "-o", str(tmp_path / "a.mp4")]
    assert serving_cli.main(argv) == 2
    assert "num_frames must be 4k+1" in capsys.readouterr().err


def test_generate_server_needs_both_sizes_and_reports_an_unreachable_server(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="both --width and --height"):
        serving_cli.main(["generate", "--prompt", "x", "--server", "http://127.0.0.1:1", "--width", "48"])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["generate", "--prompt", "x", "--server", f"http://127.0.0.1:{port}", "--wait-ready", "0.5"]
    with pytest.raises(SystemExit, match="^error: .*not ready"):
        serving_cli.main([*argv, "-o", str(tmp_path / "out.mp4")])


def test_convert_is_a_model_side_command_with_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert serving_cli.build_parser().parse_args(["convert", "a", "b"]).command == "convert"
    assert model_cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no diffusion_pytorch_model") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # compiles the tiny DiT's blocks once (≈ 20–30 s on one CPU)
def test_generate_with_compiled_blocks_and_a_named_attention_kernel_makes_the_same_video(
    tmp_path: Path,
) -> None:
    import numpy as np

    from standin.attention import configure_attention, configured_setting
    from standin.video import decode_mp4

    face = Path(__file__).parent / "data" / "faces" / "astronaut.jpg"
    argv = ["generate", "--prompt", "a person smiles", "--image", str(face), "--width", "32",
            "--height", "32", "--frames", "5", "--steps", "2", "--device", "cpu"]
    try:
        assert model_cli.main([*argv, "-o", str(tmp_path / "default.mp4")]) == 0
        assert model_cli.main([*argv, "--attention", "sdpa_math", "--compile",
                               "-o", str(tmp_path / "levers.mp4")]) == 0
        assert configured_setting() == "sdpa_math"
    finally:
        configure_attention(None)
    default, levers = (decode_mp4((tmp_path / f"{n}.mp4").read_bytes()) for n in ("default", "levers"))
    assert default.shape == levers.shape == (5, 32, 32, 3)
    diff = np.abs(default.astype(int) - levers.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
