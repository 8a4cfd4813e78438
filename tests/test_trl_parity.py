"""Parity with TRL 1.16's own loss code, in fp32 within 1e-5: DPOTrainer's loss types sigmoid / hinge /
ipo / robust, CPOTrainer's loss_type="simpo" and ORPOTrainer, on pairs of token ids.

TRL's side runs TRL's methods (`DPOTrainer._compute_loss`, `CPOTrainer.get_batch_loss_metrics`,
`ORPOTrainer.get_batch_loss_metrics`) on a trainer object given only the attributes those methods
read (no Trainer set-up, no dataset processing), with TRL's padded [chosen; rejected] batch layout
and the plain model's full-logit forward. Our side is the objective `train --loss X` builds, on the
packed shared-prompt batch through the fused log-prob path."""

import collections
import importlib
import types

import pytest
import torch

pytest.importorskip("trl")

from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

from rrhf_fast.config import TrainConfig  # noqa: E402
from rrhf_fast.data.packing import pack_tokenized  # noqa: E402
from rrhf_fast.data.tokenize import TokenizedExample  # noqa: E402
from rrhf_fast.models.logprobs import prepare_model  # noqa: E402
from rrhf_fast.models.tiny import build_tiny_model  # noqa: E402
from rrhf_fast.objectives import build_objective  # noqa: E402

TORCH_THREADS = 1
PAD = 0


@pytest.fixture(scope="module")
def model():
    return prepare_model(build_tiny_model("llama", seed=3))


@pytest.fixture(scope="module")
def pairs():
    """(prompt, chosen, rejected) token ids of four queries, lengths all different; reference sums."""
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 200, (n,), generator=gen).tolist()

    rows = [(ids(p), ids(c), ids(r)) for p, c, r in [(5, 3, 6), (2, 7, 1), (8, 4, 4), (3, 1, 9)]]
    ref = (-torch.rand(len(rows), 2, generator=gen) * 20).tolist()
    return rows, ref


def _ours(model, pairs, **flags):
    return _ours_with(model, pairs, kernels="torch", **flags)


def _ours_with(model, pairs, kernels, **flags):
    rows, ref = pairs
    items = [
        TokenizedExample(p, [c, r], [1.0, 0.0], ref_logps=list(f))
        for (p, c, r), f in zip(rows, ref, strict=True)
    ]
    flags = {"attn": "dense", **flags}
    config = TrainConfig(model="m", data="d", output_dir="o", kernels=kernels, **flags)
    objective = build_objective(config.validate())
    with torch.no_grad():
        out = objective(model, pack_tokenized(items), normalizer=objective.normalizer(items))
    return out.loss.item(), out.metrics


def _padded(rows, which):
    """TRL's rows: prompt + completion, right-padded; labels -100 on the prompt and the padding."""
    seqs = [p + (c if which == "chosen" else r) for p, c, r in rows]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), PAD)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100)
    for i, ((p, *_), s) in enumerate(zip(rows, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
    return ids, mask, labels


def _metrics():
    return collections.defaultdict(lambda: collections.defaultdict(list))


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def _trainer(cls, **attrs):
    """A TRL trainer object holding only what its loss methods read."""
    trainer = cls.__new__(cls)
    common = dict(accelerator=_Accelerator(), aux_loss_enabled=False, is_encoder_decoder=False)
    trainer.__dict__.update(common, pad_token_id=PAD, padding_value=PAD, label_pad_token_id=-100, **attrs)
    return trainer


class _FusedHead(torch.nn.Module):
    """What DPOTrainer's `fused_lm_head=True` forward returns, from the model's full logits: per-token
    log-probs of the labels (0 where a label is -100) and the statistics it logs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, use_cache):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[
            :, :-1
        ]
        target = labels[:, 1:]
        logp = logits.float().log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        zeros = torch.zeros_like(logp)
        return types.SimpleNamespace(log_probs=logp.masked_fill(target == -100, 0.0), entropy=zeros,
                                     mean_logits=zeros, is_top1=zeros.bool())  # fmt: skip


def _trl_dpo(model, pairs, loss_type, beta, label_smoothing=0.0):
    rows, ref = pairs
    chosen, rejected = _padded(rows, "chosen"), _padded(rows, "rejected")
    length = max(chosen[0].shape[1], rejected[0].shape[1])

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    ids = torch.cat([pad(chosen[0], PAD), pad(rejected[0], PAD)])
    attention = torch.cat([pad(chosen[1], 0), pad(rejected[1], 0)])
    completion = torch.cat([pad(chosen[2], -100), pad(rejected[2], -100)]) != -100
    ref_t = torch.tensor(ref)
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion.long(),
              "ref_chosen_logps": ref_t[:, 0], "ref_rejected_logps": ref_t[:, 1]}  # fmt: skip
    trainer = _trainer(
        DPOTrainer, model=model, loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", use_weighting=False, _metrics=_metrics(), _total_train_tokens=0,
        _tp_size=1,
    )  # fmt: skip
    with torch.no_grad():
        return DPOTrainer._compute_loss(trainer, _FusedHead(model), inputs, False).item()


@pytest.mark.parametrize(
    ("loss_type", "beta", "smoothing"),
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.1, 0.0), ("ipo", 0.1, 0.0), ("ipo", 2.0, 0.0),
     ("robust", 0.1, 0.0), ("robust", 0.3, 0.2)],
    ids=["sigmoid", "sigmoid-beta0.5", "hinge", "ipo", "ipo-beta2", "robust-no-flips", "robust-flips0.2"],
)  # fmt: skip
def test_dpo_loss_types_equal_trl_dpo_trainer(model, pairs, loss_type, beta, smoothing):
    want = _trl_dpo(model, pairs, loss_type, beta, smoothing)
    got, _ = _ours(model, pairs, loss="dpo", dpo_beta=beta, dpo_loss=loss_type, dpo_label_smoothing=smoothing)
    assert got == pytest.approx(want, abs=1e-5, rel=1e-5)


def test_dpo_pl_at_k2_equals_trl_dpo_sigmoid(model, pairs):
    want = _trl_dpo(model, pairs, "sigmoid", 0.1)
    got, _ = _ours(model, pairs, loss="dpo-pl", dpo_beta=0.1)
    assert got == pytest.approx(want, abs=1e-5, rel=1e-5)


def _cpo_batch(rows):
    batch = {}
    for which in ("chosen", "rejected"):
        ids, mask, labels = _padded(rows, which)
        batch.update({f"{which}_input_ids": ids, f"{which}_attention_mask": mask, f"{which}_labels": labels})
    return batch


@pytest.mark.parametrize(
    ("beta", "gamma"), [(2.0, 0.5), (2.5, 1.4), (0.1, 0.0)], ids=["paper", "llama3", "no-margin"]
)
def test_simpo_equals_trl_cpo_trainer_simpo(model, pairs, beta, gamma):
    trainer = _trainer(CPOTrainer, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0,
                       cpo_alpha=0.0, alpha=0.0, _stored_metrics=_metrics())  # fmt: skip
    with torch.no_grad():
        want, _ = CPOTrainer.get_batch_loss_metrics(trainer, model, _cpo_batch(pairs[0]))
    got, _ = _ours(model, pairs, loss="simpo", simpo_beta=beta, simpo_gamma=gamma)
    assert got == pytest.approx(want.item(), abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_orpo_odds_ratio_term_equals_trl_orpo_trainer(model, pairs, lam):
    """TRL's ORPO loss = NLL - beta * mean log sigmoid(log odds ratio); its NLL also counts the prompt
    tokens (the paper's L_SFT does not), so the odds-ratio term is compared, and our SFT term is
    checked against the chosen responses' token-mean NLL of the same forward."""
    rows, _ = pairs
    trainer = _trainer(ORPOTrainer, beta=lam)
    batch = _cpo_batch(rows)
    with torch.no_grad():
        logps = ORPOTrainer.concatenated_forward(trainer, model, batch)
        losses, *_ = ORPOTrainer.odds_ratio_loss(trainer, logps[0], logps[1])
    _, metrics = _ours(model, pairs, loss="orpo", orpo_lambda=lam)
    rank_loss, sft_loss = metrics.terms[1].item(), metrics.terms[2].item()
    assert rank_loss == pytest.approx(-losses.mean().item(), abs=1e-5, rel=1e-5)
    assert sft_loss == pytest.approx(-logps[0].mean().item(), abs=1e-5, rel=1e-5)  # mean of per-token means


@pytest.mark.parametrize("loss", ["lipo", "pro"])
def test_the_fused_triton_kernel_gives_the_same_loss(model, pairs, loss, monkeypatch):
    """The losses read the fused token log-prob kernel (Triton; on the CPU under TRITON_INTERPRET)."""
    kernel = importlib.import_module("rrhf_fast.kernels.token_logprobs")  # the module, not the function

    flags = dict(loss=loss, attn="dense")
    want, _ = _ours(model, pairs, **flags)
    calls = []
    launcher = kernel._forward
    monkeypatch.setattr(kernel, "_forward", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    got, _ = _ours_with(model, pairs, kernels="triton", **flags)
    assert calls  # the Triton launcher ran
    assert got == pytest.approx(want, abs=1e-5, rel=1e-5)
