"""Real data: the shared CIFAR-10 (JPEG) set, skipped when it is not present."""

from hypersearch.app import main as hs_main
from tests.helpers.runs import read_json, run_hydra


def test_hypersearch_learns_real_cifar10(cifar10_jpeg, tmp_path):
    """300 steps of the tiny HS model (batch 64, 16 px after the stem) beat chance (10%) by far."""
    run_dir = tmp_path / "hs"
    run_hydra(
        hs_main,
        [
            "arch=tiny",
            "arch.strides=[2,2,2,2,1]",
            "data=imagefolder",
            f"data.root={cifar10_jpeg}",
            "data.batch_size=64",
            "data.test_subset=2000",
            "epochs=1",
            "max_steps_per_epoch=300",
            "sched.warmup_epochs=0.1",
            "optim.lr=0.4",
            "progress=off",
            "device=cpu",
            f"hydra.run.dir={run_dir}",
        ],
    )
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "completed" and metrics["steps"] == 300
    print(f"HS tiny, 300 steps on real CIFAR-10: test top-1 {metrics['top1']:.2f}%")
    assert metrics["top1"] > 30.0
