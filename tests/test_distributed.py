"""Several processes on CPU (gloo): one real 2-rank DDP fit, launched as users launch it (`python -m lit_flash fit`
with `trainer.devices=2`; Lightning starts the second rank itself), then a 1-process validate and a 1-process
resume of its checkpoint in this process. Plus the pure helpers on their own."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from _helpers import print_config, tiny_module
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from lit_flash.cli import cli_main, config_path
from lit_flash.distributed import check_resume, shard_sampler
from lit_flash.errors import LitFlashError

SRC = Path(__file__).resolve().parents[1] / "src"
N_TRAIN, N_VAL, BLOCK, VOCAB, BATCH = 37, 11, 32, 300, 4  # odd sizes: a remainder on 2 ranks
WORLD = 2
STEPS_PER_EPOCH_2 = -(-(N_TRAIN // WORLD) // BATCH)  # 18 rows per rank -> 5 batches
STEPS_PER_EPOCH_1 = -(-N_TRAIN // BATCH)  # 10 batches
DDP_YAML = yaml.safe_load(config_path("ddp.yaml").read_text())

# A test-only callback, written beside the data and put on PYTHONPATH: every rank writes which training rows
# (their first token is the row number + 1) it saw in each epoch, and the val_ppl it ends with.
RECORDER = '''
import json
from pathlib import Path
import lightning as L


class SeenSamples(L.Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = (batch["input_ids"][:, 0] - 1).tolist()
        self.seen.setdefault(str(trainer.current_epoch), []).extend(ids)

    def on_fit_end(self, trainer, pl_module):
        ppl = float(trainer.callback_metrics["val_ppl"])
        weights = [p.detach().double().sum().item() for p in pl_module.parameters()]
        out = {"seen": self.seen, "world_size": trainer.world_size, "val_ppl": ppl, "weights": weights}
        name = f"seen_rank{trainer.global_rank}.json"
        (Path(trainer.default_root_dir) / name).write_text(json.dumps(out))
'''


def build_blocks(path: Path) -> None:
    """A reference-format DatasetDict: training row i starts with token i + 1 (so rows can be told apart),
    the rest is a learnable sequence (a random start and stride)."""
    import datasets

    gen = torch.Generator().manual_seed(0)

    def rows(n: int, first: list[int] | None) -> dict[str, list[list[int]]]:
        starts = torch.randint(0, VOCAB, (n,), generator=gen)
        strides = torch.randint(1, 5, (n,), generator=gen)
        ids = (starts[:, None] + strides[:, None] * torch.arange(BLOCK)) % VOCAB
        if first is not None:
            ids[:, 0] = torch.tensor(first)
        ids = ids.tolist()
        return {"input_ids": ids, "attention_mask": [[1] * BLOCK] * n, "labels": ids}

    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows(N_TRAIN, [i + 1 for i in range(N_TRAIN)])),
        validation=datasets.Dataset.from_dict(rows(N_VAL, None)),
    ).save_to_disk(str(path))


def tiny_config(tmp: Path) -> Path:
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": WORLD,
            "strategy": DDP_YAML["trainer"]["strategy"],  # what users run: ddp.yaml's DDP settings
            "precision": "32-true",
            "max_epochs": 2,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp / "run"),
            "callbacks": [{"class_path": "seen_samples.SeenSamples"}],
        },
        "model": {
            "model_name_or_path": None,
            "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": VOCAB, "n_positions": BLOCK,
                             "bos_token_id": 0, "eos_token_id": 0},
            "attn_implementation": "sdpa",
            "learning_rate": 1.0e-2,
            "weight_decay": 0.01,
        },
        "data": {
            "tokenized_dataset_load_dir": str(tmp / "blocks"),
            "tokenizer_name": None,
            "batch_size": BATCH,
            "eval_batch_size": BATCH,
        },
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_folder(tmp: Path) -> tuple[Path, dict[str, str]]:
    """The blocks, the recorder and the tiny config in `tmp`; the environment a subprocess run needs."""
    build_blocks(tmp / "blocks")
    (tmp / "seen_samples.py").write_text(RECORDER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(tmp)]), OMP_NUM_THREADS="1")
    return tiny_config(tmp), env


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One 2-rank DDP fit (2 epochs) in a subprocess, as a user runs it."""
    tmp = tmp_path_factory.mktemp("ddp")
    config, env = run_folder(tmp)
    env.pop("MASTER_PORT", None)  # Lightning picks a free one
    proc = subprocess.run(
        [sys.executable, "-m", "lit_flash", "fit", "--config", str(config)],
        env=env, cwd=tmp, capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    root = tmp / "run"
    ranks = [json.loads((root / f"seen_rank{r}.json").read_text()) for r in range(WORLD)]
    sys.path.insert(0, str(tmp))  # the recorder, for the in-process runs below
    yield SimpleNamespace(tmp=tmp, root=root, config=config, output=output, ranks=ranks)
    sys.path.remove(str(tmp))


@pytest.mark.slow  # the module's 2-rank DDP fit
def test_each_rank_trains_on_its_own_shard(ddp_fit: SimpleNamespace) -> None:
    assert [r["world_size"] for r in ddp_fit.ranks] == [WORLD, WORLD]
    orders = []
    for epoch in ("0", "1"):
        shards = [r["seen"][epoch] for r in ddp_fit.ranks]
        assert [len(s) for s in shards] == [N_TRAIN // WORLD] * WORLD  # equal shares: no rank waits on another
        seen = [i for s in shards for i in s]
        assert len(seen) == len(set(seen)), "a row was seen twice in one epoch"
        assert set(seen) <= set(range(N_TRAIN)) and len(set(seen)) == N_TRAIN - N_TRAIN % WORLD  # only the remainder
        orders.append(shards[0])
    assert orders[0] != orders[1], "the shuffle must change with the epoch (set_epoch)"


@pytest.mark.slow  # the module's 2-rank DDP fit
def test_gradients_are_averaged_across_ranks(ddp_fit: SimpleNamespace) -> None:
    # Each rank trained on other rows: only averaged gradients (ddp.yaml's one bucket, viewed in place) leave every
    # rank with the same weights after 10 steps.
    weights = [r["weights"] for r in ddp_fit.ranks]
    assert len(weights[0]) > 1 and weights[0] == weights[1]


@pytest.mark.slow  # the module's 2-rank DDP fit
def test_val_ppl_same_on_every_rank_and_equal_to_one_process(ddp_fit: SimpleNamespace) -> None:
    ppl = [r["val_ppl"] for r in ddp_fit.ranks]
    assert ppl[0] == ppl[1]
    cli = cli_main([
        "validate", "--config", str(ddp_fit.config), "--trainer.devices=1", "--trainer.strategy=auto",
        f"--trainer.default_root_dir={ddp_fit.tmp / 'validate'}",
        f"--ckpt_path={ddp_fit.root / 'checkpoints' / 'last.ckpt'}",
    ])
    single = float(cli.trainer.callback_metrics["val_ppl"])
    # Exact up to float summation order; a padded (repeated) validation row would move it by ~1e-3.
    assert single == pytest.approx(ppl[0], rel=1e-5)


@pytest.mark.slow  # the module's 2-rank DDP fit
def test_checkpoints_export_and_logs_written_once(ddp_fit: SimpleNamespace) -> None:
    root = ddp_fit.root
    expected = [f"epoch=0-step={STEPS_PER_EPOCH_2}.ckpt", f"epoch=1-step={2 * STEPS_PER_EPOCH_2}.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == expected
    assert ddp_fit.output.count("Exported the Hugging Face model") == 1
    assert "sync_dist=True" not in ddp_fit.output  # val_loss/val_ppl are synced before they are logged
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("metrics.csv")) == ["logs/version_0/metrics.csv"]
    assert [p.name for p in (root / "logs").iterdir()] == ["version_0"]
    rows = (root / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    val_ppl = [float(v) for r in rows[1:] if (v := r.split(",")[header.index("val_ppl")])]
    assert len(val_ppl) == 2 and val_ppl[-1] == pytest.approx(ddp_fit.ranks[0]["val_ppl"])
    # The export holds the final (rank-0 = all ranks') weights.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(root / "model"))
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    key = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(exported.get_parameter(key), state[f"model.{key}"])


@pytest.mark.slow  # the module's 2-rank DDP fit
def test_ddp_checkpoint_resumes_on_one_process(ddp_fit: SimpleNamespace) -> None:
    root = ddp_fit.tmp / "resumed"
    cli = cli_main([
        "fit", "--config", str(ddp_fit.config), "--trainer.devices=1", "--trainer.strategy=auto",
        "--trainer.max_epochs=3", f"--trainer.default_root_dir={root}",
        f"--ckpt_path={ddp_fit.root / 'checkpoints' / 'last.ckpt'}",
    ])
    assert cli.trainer.current_epoch == 3
    assert cli.trainer.global_step == 2 * STEPS_PER_EPOCH_2 + STEPS_PER_EPOCH_1  # the third epoch on one process
    seen = json.loads((root / "seen_rank0.json").read_text())["seen"]
    assert sorted(seen["2"]) == list(range(N_TRAIN))  # one process: every row, none dropped


# ------------------------------------------------------------------------------------------------ helpers


def fake_trainer(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(distributed_sampler_kwargs={"num_replicas": world, "rank": rank})


def test_shard_sampler_train_drops_only_the_remainder() -> None:
    data = list(range(11))
    samplers = [shard_sampler(data, fake_trainer(r, 3), shuffle=True, seed=1) for r in range(3)]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        shards = [list(s) for s in samplers]
        flat = [i for s in shards for i in s]
        assert [len(s) for s in shards] == [3, 3, 3] and len(set(flat)) == 9


def test_shard_sampler_eval_covers_every_row_once() -> None:
    data = list(range(11))
    shards = [list(shard_sampler(data, fake_trainer(r, 3), shuffle=False, seed=1)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == data
    assert shard_sampler(data, fake_trainer(0, 1), shuffle=True, seed=1) is None
    assert shard_sampler(data, None, shuffle=False, seed=1) is None
    with pytest.raises(LitFlashError, match="fewer than the 4 processes"):
        shard_sampler(data[:3], fake_trainer(0, 4), shuffle=False, seed=1)


def test_shard_sampler_eval_under_fsdp_gives_every_rank_as_many_rows() -> None:
    """Every FSDP forward is a collective: unequal batch counts would hang, so evaluation pads as Lightning does."""
    from lightning.pytorch.strategies import FSDPStrategy

    data = list(range(11))
    trainers = [fake_trainer(r, 3) for r in range(3)]
    for trainer in trainers:
        trainer.strategy = FSDPStrategy()
    shards = [list(shard_sampler(data, t, shuffle=False, seed=1)) for t in trainers]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sorted(set(i for s in shards for i in s)) == data


def test_hf_trainer_checkpoint_folder_points_to_model_name_or_path(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-500"  # what the reference recipe's HF Trainer writes
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    for strategy in ("ddp", "fsdp"):
        with pytest.raises(LitFlashError, match="--model.model_name_or_path .*checkpoint-500"):
            check_resume(str(folder), strategy)


def test_sharded_fsdp_checkpoint_needs_fsdp(tmp_path: Path) -> None:
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / "meta.pt").write_bytes(b"")  # Lightning's mark of a sharded checkpoint
    with pytest.raises(LitFlashError, match="consolidate_checkpoint"):
        check_resume(str(folder), "ddp")
    check_resume(str(folder), "fsdp")
    check_resume("last", "ddp")
    (tmp_path / "plain.ckpt").write_bytes(b"")
    check_resume(str(tmp_path / "plain.ckpt"), "ddp")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_folder_that_is_no_checkpoint_is_called_so(tmp_path: Path, strategy: str) -> None:
    folder = tmp_path / "given"
    folder.mkdir()
    with pytest.raises(LitFlashError, match=r"given is an empty folder, not a checkpoint: .*--ckpt_path last"):
        check_resume(str(folder), strategy)
    (folder / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(LitFlashError, match=r"given is a folder but not a checkpoint \(a sharded FSDP .*meta\.pt\)"):
        check_resume(str(folder), strategy)


def test_cli_refuses_sharded_checkpoint_under_ddp(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "sharded.ckpt"
    folder.mkdir()
    (folder / "meta.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(config_path("demo.yaml")), f"--trainer.default_root_dir={tmp_path}",
                  f"--ckpt_path={folder}"])
    assert exc.value.code == 2
    assert "sharded FSDP checkpoint" in capsys.readouterr().err


def test_overlays_merge_onto_the_recipe(capsys: pytest.CaptureFixture) -> None:
    ddp = print_config("gpt2_flash.yaml", "ddp.yaml", capsys=capsys)
    assert ddp["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    assert ddp["trainer"]["devices"] == -1
    assert ddp["data"]["batch_size"] == 8 and ddp["trainer"]["precision"] == "16-mixed"  # the recipe's, kept
    assert "optimizer" not in ddp and "lr_scheduler" not in ddp  # no top-level keys: model.* configures both
    fsdp = print_config("gpt2_flash.yaml", "multinode.yaml", "fsdp.yaml", capsys=capsys)
    strategy = fsdp["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy["init_args"]["auto_wrap_policy"] == ["transformers.models.gpt2.modeling_gpt2.GPT2Block"]
    assert strategy["init_args"]["state_dict_type"] == "full"
    assert fsdp["trainer"]["num_nodes"] == 2 and fsdp["trainer"]["accelerator"] == "gpu"
    assert fsdp["model"]["model_name_or_path"] == "openai-community/gpt2"


def test_ddp_overlay_settings_reach_ddp(tmp_path: Path) -> None:
    cli = cli_main(["--config", str(config_path("demo.yaml")), "--config", str(config_path("ddp.yaml")),
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.devices=1"],
                   run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    kwargs = cli.trainer.strategy._ddp_kwargs
    assert kwargs["bucket_cap_mb"] == 500 and kwargs["gradient_as_bucket_view"] is True
    # jsonargparse spells out DistributedDataParallel's other arguments: they must be its own defaults.
    defaults = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    others = {k: v for k, v in kwargs.items() if k not in ("bucket_cap_mb", "gradient_as_bucket_view")}
    assert others and all(v == defaults[k].default for k, v in others.items())
    # What README gives for DDP's own buckets: the strategy's name replaces the overlay's arguments.
    cli = cli_main(["--config", str(config_path("demo.yaml")), "--config", str(config_path("ddp.yaml")),
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.devices=1",
                    "--trainer.strategy=ddp"], run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy) and cli.trainer.strategy._ddp_kwargs == {}


@pytest.mark.slow
def test_torchrun_two_nodes_with_the_multinode_overlay(tmp_path: Path) -> None:
    """The README's several-node form on CPU: two `torchrun --nnodes 2` launches (one process each, as two nodes
    would run), `configs/multinode.yaml` with CPU sizes; Lightning takes ranks from torchrun's environment."""
    import socket

    config, env = run_folder(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
             "--master_addr=127.0.0.1", f"--master_port={port}",
             "-m", "lit_flash", "fit", "--config", str(config), "--config", str(config_path("multinode.yaml")),
             "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_epochs=1"],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    root = tmp_path / "run"
    ranks = [json.loads((root / f"seen_rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    shards = [r["seen"]["0"] for r in ranks]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == N_TRAIN // 2
    assert ranks[0]["val_ppl"] == ranks[1]["val_ppl"]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == [f"epoch=0-step={STEPS_PER_EPOCH_2}.ckpt",
                                                                       "last.ckpt"]
    assert sum(out.count("Exported the Hugging Face model") for out in outputs) == 1


def test_ddp_broadcasts_no_buffer_before_each_forward(tmp_path: Path) -> None:
    # vocab_bias is a constant: were DDP to sync it, each gradient-syncing forward would start with a broadcast.
    module = tiny_module({"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": BLOCK, "n_embd": 16, "n_layer": 1,
                          "n_head": 2}, pad_vocab_to_multiple_of=64)
    assert [name for name, _ in module.named_buffers()] == ["vocab_bias"]
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(module)
        assert ddp.modules_buffers == [] and not ddp.will_sync_module_buffers()
        assert len(list(ddp.parameters())) == len(list(module.parameters()))  # every weight is still reduced
    finally:
        torch.distributed.destroy_process_group()
