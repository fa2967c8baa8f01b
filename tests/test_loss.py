"""The loss module (loss_llava_radz.py): gathered negatives across 2 gloo processes equal one process holding the
whole batch, on the loss and on the gradients averaged by DDP, for every gathering mode; remote-code rules."""

import pytest

from conftest import free_port, run_script


# A stand-in for the model: linear "encoders" with the model's parameter kinds (per-sample weights, a temperature
# used in full by every rank, anchors and a sigmoid bias), calling the loss module inside the forward, as the model
# does, and wrapped in real DDP.
DDP_SCRIPT = r"""
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from loss_llava_radz import LlavaRadZLoss

SIZES = [5, 3]  # uneven shards, as after skipped bad samples
MODES = [dict(), dict(gather_with_grad=True), dict(gather_with_grad=True, local_loss=True)]


class Encoders(nn.Module):
    def __init__(self, loss_fn, alignment, kind):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(6, 4), nn.Linear(6, 4)
        self.image_local, self.text_local = nn.Linear(6, 4), nn.Linear(6, 4)
        self.logit_scale = nn.Parameter(torch.tensor(1.5))
        self.anchors = nn.Parameter(torch.randn(3, 4))
        self.bias = nn.Parameter(torch.tensor(-0.3)) if kind == "sigmoid" else None
        self.loss_fn, self.alignment, self.kind = loss_fn, alignment, kind

    def forward(self, x, y, labels):
        embeds = [F.normalize(layer(v), dim=-1) for layer, v in
                  ((self.image, x), (self.text, y), (self.image_local, x), (self.text_local, y))]
        return self.loss_fn(*embeds, self.logit_scale.exp(), alignment=self.alignment,
                            anchor_embeds=F.normalize(self.anchors, dim=-1), labels=labels, category_kind=self.kind,
                            category_bias=self.bias, dkam_lambda=0.5)


def batch():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(sum(SIZES), 6, generator=generator), torch.randn(sum(SIZES), 6, generator=generator)
    labels = (torch.rand(sum(SIZES), 3, generator=generator) > 0.5).float()
    labels[0, 1] = labels[4, 2] = float("nan")
    return x, y, labels


def worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, y, labels = batch()
    shard = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
    for alignment in ("global", "cross"):
        for kind in ("softmax", "sigmoid"):
            whole = Encoders(LlavaRadZLoss(), alignment, kind)
            expected = whole(x, y, labels)
            expected.loss.backward()
            for mode in MODES:
                loss_fn = LlavaRadZLoss(rank=rank, world_size=2, **mode)
                model = DistributedDataParallel(Encoders(loss_fn, alignment, kind), find_unused_parameters=True)
                out = model(x[shard], y[shard], labels[shard])
                out.loss.backward()  # DDP averages the gradients over the ranks
                loss = out.loss.detach().clone()
                dist.all_reduce(loss)  # with local_loss each rank holds its share; otherwise both the global loss
                name = f"{alignment}/{kind}/{mode}"
                if mode.get("local_loss"):
                    torch.testing.assert_close(loss / 2, expected.loss.detach(), msg=name)
                else:
                    torch.testing.assert_close(out.loss.detach(), expected.loss.detach(), msg=name)
                torch.testing.assert_close(out.loss_category, expected.loss_category, msg=name)
                for (param_name, p), q in zip(model.module.named_parameters(), whole.parameters()):
                    if q.grad is None:  # the local heads are unused with global alignment
                        assert p.grad is None, name
                        continue
                    torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=f"{name} {param_name}")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(worker, args=(int(sys.argv[1]),), nprocs=2, start_method="fork")
    print("ok")
"""


def test_gathered_loss_and_ddp_gradients_equal_one_process_with_the_whole_batch(tmp_path):
    """For global and cross alignment, softmax and sigmoid L_CG, uneven shards and each gathering mode (own rows
    scaled, differentiable gather, local loss), 2 DDP ranks give the single-process loss and gradients."""
    assert run_script(tmp_path, DDP_SCRIPT, str(free_port())).strip() == "ok"


GATHER_SCRIPT = r"""
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from loss_llava_radz import gather_features

def worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rows = 3 if rank == 0 else 1  # uneven shards
    local = torch.full((rows, 2), float(rank + 1), requires_grad=True)
    labels = torch.full((rows, 1), float("nan") if rank else 1.0)
    embeds, gathered_labels = gather_features([local, labels], rank=rank, world_size=2)
    assert embeds.tolist() == [[1.0, 1.0]] * 3 + [[2.0, 2.0]], embeds
    assert gathered_labels[:3].eq(1).all() and gathered_labels[3].isnan().all()
    embeds.sum().backward()
    assert local.grad.eq(2.0).all(), local.grad  # own rows only, times the world size
    local.grad = None
    (embeds,) = gather_features([local], gather_with_grad=True, rank=rank, world_size=2)
    (embeds.sum() * (rank + 1)).backward()
    assert local.grad.eq(3.0).all(), local.grad  # the sum over the ranks' losses (1 + 2) reaches every rank's rows
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.start_processes(worker, args=(int(sys.argv[1]),), nprocs=2, start_method="fork")
    print("ok")
"""


def test_gather_features_handles_uneven_shards_and_routes_gradients(tmp_path):
    assert run_script(tmp_path, GATHER_SCRIPT, str(free_port())).strip() == "ok"


def test_local_loss_without_a_differentiable_gather_is_refused():
    from loss_llava_radz import LlavaRadZLoss

    with pytest.raises(ValueError, match="local_loss=True needs gather_with_grad=True"):
        LlavaRadZLoss(local_loss=True, world_size=2)


def test_the_forward_loss_is_the_loss_module_s(tiny_model):
    """The model computes its loss once, with its loss module: a replaced module's result is what comes out."""
    import torch

    from loss_llava_radz import LlavaRadZLoss, LlavaRadZLossOutput

    model, processor = tiny_model
    inputs = processor(images=[torch.rand(3, 32, 32).numpy().transpose(1, 2, 0)] * 2, text=["a", "b"])
    baseline = model(**inputs, return_loss=True)

    class Recording(LlavaRadZLoss):
        calls = 0

        def forward(self, *args, **kwargs):
            Recording.calls += 1
            return LlavaRadZLossOutput(loss=super().forward(*args, **kwargs).loss * 2, loss_alignment=torch.tensor(0.0))

    model.loss_fn = Recording()
    out = model(**inputs, return_loss=True)
    assert Recording.calls == 1
    torch.testing.assert_close(out.loss, baseline.loss * 2)


def test_checkpoint_carries_the_loss_module_which_imports_nothing_from_radz(tiny_checkpoint):
    source = (tiny_checkpoint / "loss_llava_radz.py").read_text()
    assert "radz." not in source.replace("llava_radz", "")
    assert "from .loss_llava_radz import" in (tiny_checkpoint / "modeling_llava_radz.py").read_text()
