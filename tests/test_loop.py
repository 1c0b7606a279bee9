"""The training loop of every script never waits for the device between evaluations: counted on the
CPU by recording every call that would synchronise a GPU (.item(), .cpu(), .tolist(), .numpy(),
bool/int/float of a tensor, torch.cuda.synchronize, the toolkit's own sync) outside the evaluations, for two runs with
the same evaluations and different numbers of steps."""
import pytest
import torch

import common
import exp_cifar_cnn
import exp_deep_mlp_rank
import exp_imagenette_resnet
import exp_mnist_mlp
import exp_modular_arith

SYNCING = [(torch.Tensor, name) for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__")]
SYNCING += [(torch.cuda, "synchronize"), (common, "sync")]  # common.sync: what a GPU run would wait on


def count_syncs_in_training(monkeypatch, module, argv):
    counting, calls = [True], []

    def counted(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if counting[0]:
                calls.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    def not_counted(name):
        original = getattr(common, name)

        def wrapper(*args, **kwargs):
            counting[0] = False
            try:
                return original(*args, **kwargs)
            finally:
                counting[0] = True
        monkeypatch.setattr(common, name, wrapper)

    cfg = common.parse_config(module.Config, argv)
    for owner, name in SYNCING:
        counted(owner, name)
    for name in ("evaluate_and_log", "finish_run", "start_run", "restore"):
        not_counted(name)
    with monkeypatch.context():
        module.main(cfg)
    monkeypatch.undo()
    return calls


@pytest.mark.parametrize("module, data", [
    (exp_modular_arith, None), (exp_mnist_mlp, "mnist_dir"), (exp_deep_mlp_rank, "mnist_dir"),
    (exp_cifar_cnn, "cifar_npz"), (exp_imagenette_resnet, "image_folder")], ids=lambda m: getattr(m, "__name__", m))
def test_no_device_sync_between_evaluations(module, data, request, tmp_path, monkeypatch):
    # the smallest measurements: they run inside the evaluations, which are not counted
    flags = ["--quick", "--device", "cpu", "--evals", "2", "--lc-points", "2", "--pgd-points", "2", "--rank-points", "2",
             "--partition-resolution", "8"] + (["--rank-every", "1000"] if module is exp_deep_mlp_rank else [])
    if data:
        flags += ["--data-dir", str(request.getfixturevalue(data))] + (["--no-download"] if data != "cifar_npz" else [])
    short = count_syncs_in_training(monkeypatch, module, flags + ["--steps", "6", "--out", str(tmp_path / "a")])
    long = count_syncs_in_training(monkeypatch, module, flags + ["--steps", "12", "--out", str(tmp_path / "b")])
    assert short == long  # setup may sync once; the 6 extra steps add nothing


def test_batch_loss_max_is_the_worst_batch_since_the_previous_evaluation(tmp_path, monkeypatch):
    """Every training batch's loss recorded as the script computes it (modular arithmetic trains on the
    full batch of 264 pairs with --quick): each record's batch_loss_max is the maximum of the losses of
    the steps since the previous evaluation, and step 0's record has none."""
    import torch.nn.functional as F
    from conftest import records, run_script
    original, losses = F.cross_entropy, []

    def recording(logits, target, *args, **kwargs):
        loss = original(logits, target, *args, **kwargs)
        if torch.is_grad_enabled() and logits.requires_grad and logits.shape[0] == 264:  # a training step
            losses.append(loss.item())
        return loss

    monkeypatch.setattr(F, "cross_entropy", recording)
    run_script("exp_modular_arith.py", "--quick", "--out", tmp_path / "run")
    logged = records(tmp_path / "run")
    assert len(losses) == 300 and "batch_loss_max" not in logged[0]
    for before, record in zip(logged, logged[1:]):  # steps before.step .. record.step - 1 ran since `before`
        assert record["batch_loss_max"] == pytest.approx(max(losses[before["step"]:record["step"]]), rel=1e-6)
