"""The README's main job, shortened: QLoRA on the tiny built-in Llama, save, reload, same logits."""
from peftfast.cli.demo import run_demo


def test_demo_trains_saves_and_reloads(tmp_path, capsys):
    result = run_demo(steps=40, output=str(tmp_path / "adapter"), log_every=20)
    losses = result["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    assert result["max_abs_diff"] < 1e-4
    out = capsys.readouterr().out
    assert "trainable params:" in out and "|| all params:" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
