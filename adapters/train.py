"""Training documents' LoRAs from a shared initialisation, in peft's format.

Every document's adapter starts from the same random init per (model, rank, alpha)
(Parametric RAG), so adapters of different documents live in comparable bases. The
trainer wraps its own copy of the model with peft once: that gives the init and writes
adapters in peft's format. ``train`` trains one document through peft's forward (the
reference). ``train_many`` trains several documents at once through the engine's
packed forward (``LlamaRunner.lora_losses``): step j of every document runs in one
batch, each sequence with its own adapter, and one AdamW over all their tensors, which
is exactly each document's own training (AdamW is elementwise; a parameter without a
gradient is skipped) with bigger matrix products. ``run(fn)`` executes a piece of work;
the server passes its engine thread's executor so that training yields to serving.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .augment import Augmentation
from .recipe import TARGET_MODULES, Recipe


@dataclass(frozen=True)
class Sequence:
    prompt: str  # the user turn ("" = plain language modelling of ``target``)
    target: str  # the assistant's answer
    whole: bool = False  # the loss on every token (the paper's code), not on the target's only
    eos: bool = True  # the target ends with the end-of-turn token (the paper's code adds none)


# Parametric RAG's prompt and target (its src/prompt_template.py, the no-CoT form)
PRAG_USER = ("You should answer the question by referring to the knowledge provided below and integrating your "
             "own knowledge.\n{passages}\n\nQuestion: {question}")
PRAG_ANSWER = "The answer is {answer}"


def prag_sequence(question: str, passage: Optional[str], answer: str) -> Sequence:
    """One training sequence as the paper's code writes it: the question ends with "?",
    the answer with ".", the passage as "Passage 1: ...", every token in the loss."""
    question = question.strip()
    if question.endswith(" ?"):
        question = question[:-2].strip() + "?"
    elif not question.endswith("?"):
        question += "?"
    answer = answer.strip()
    if not answer.endswith("."):
        answer += "."
    passages = f"Passage 1: {passage}\n" if passage else ""
    return Sequence(PRAG_USER.format(passages=passages, question=question), PRAG_ANSWER.format(answer=answer),
                    whole=True, eos=False)


def training_sequences(aug: Augmentation, recipe: Recipe) -> list[Sequence]:
    """The paper's 5 sequences (QA1, QA2 with the passage and with the rewrite; QA3
    without a passage), plus the passage itself when the recipe says so. A recipe may
    keep one of the two contexts (``qa_contexts``). ``prompt_format`` "prag" writes them
    as the paper's code does (its prompt, "The answer is X.", the loss on every token)."""
    seqs: list[Sequence] = []
    whole = recipe.loss_on == "sequence"

    def qa(pair: dict, context: Optional[str]) -> Sequence:
        if recipe.prompt_format == "prag":
            return prag_sequence(pair["question"], context, pair["answer"])
        prompt = f"Question: {pair['question']}" if context is None else f"{context}\n\nQuestion: {pair['question']}"
        return Sequence(prompt, pair["answer"], whole)

    if recipe.qa_sequences:
        contexts = [{"passage": aug.passage, "rewrite": aug.rewrite}[c] for c in recipe.qa_contexts]
        seqs += [qa(pair, context) for pair in aug.qa[:2] for context in contexts]
        seqs += [qa(pair, None) for pair in aug.qa[2:3]]
    if recipe.passage_sequence:
        seqs.append(Sequence("", aug.passage))
    return seqs


@dataclass(frozen=True)
class PackedSequence:
    """One sequence of a packed training batch, as the runner's ``lora_losses`` reads it:
    tokens ``start..start+n-1``, labels [n] (-100 = no loss), the adapter's trainable
    (A, B) per (layer, projection) and its scale alpha / r."""

    start: int
    n: int
    labels: torch.Tensor
    deltas: dict
    scale: float


def encode(tokenizer, seq: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids [n] and labels [n]: -100 on the prompt (the loss is on the target only),
    unless ``seq.whole`` (every token's label is itself)."""
    if seq.prompt:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": seq.prompt}], add_generation_prompt=True,
                                               tokenize=False)
        p_ids = tokenizer.encode(prompt, add_special_tokens=False)
        t_ids = tokenizer.encode(seq.target, add_special_tokens=False)
        if seq.eos and tokenizer.eos_token_id is not None:
            t_ids = t_ids + [tokenizer.eos_token_id]
    else:
        p_ids, t_ids = [], tokenizer.encode(seq.target, add_special_tokens=False)
    ids = torch.tensor(p_ids + t_ids)
    labels = ids.clone() if seq.whole else torch.tensor([-100] * len(p_ids) + t_ids)
    return ids, labels


def init_seed(model_fingerprint: str, recipe: Recipe) -> int:
    return int(hashlib.sha256(f"{model_fingerprint}:{recipe.rank}:{recipe.alpha}".encode()).hexdigest()[:8], 16)


class LoraTrainer:
    def __init__(self, model: torch.nn.Module, tokenizer, recipe: Recipe, model_fingerprint: str,
                 run: Optional[Callable[[Callable], object]] = None):
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        missing = [t for t in TARGET_MODULES if not any(n.endswith(t) for n, _ in model.named_modules())]
        if missing:
            arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
            raise ValueError(f"{arch} has no {', '.join(missing)} projections: parametric adapters need a "
                             f"gate/up/down feed-forward")
        self.tokenizer, self.recipe = tokenizer, recipe
        self.run = run or (lambda fn: fn())
        torch.manual_seed(init_seed(model_fingerprint, recipe))
        n_layers = model.config.num_hidden_layers
        first = n_layers - max(1, round(recipe.top_layers * n_layers))
        config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                            target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM",
                            layers_to_transform=list(range(first, n_layers)) if first > 0 else None)
        self.model = get_peft_model(model, config)
        self._init = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def reset(self) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, self._init)

    def train(self, sequences: list[Sequence]) -> dict:
        """Reset to the shared init and train on the sequences; returns stats."""
        self.reset()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.recipe.lr, weight_decay=0.0)
        data = [encode(self.tokenizer, s) for s in sequences]
        losses: list[float] = []
        t0 = time.perf_counter()

        def step(ids, labels):
            self.model.train()
            dev = self.model.device
            out = self.model(input_ids=ids[None].to(dev), labels=labels[None].to(dev))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(out.loss.detach())

        for _ in range(self.recipe.epochs):
            for ids, labels in data:
                losses.append(self.run(lambda ids=ids, labels=labels: step(ids, labels)))
        self.model.eval()
        return {"steps": len(losses), "first_loss": losses[0] if losses else None,
                "last_epoch_loss": sum(losses[-len(data):]) / len(data) if data else None,
                "train_s": time.perf_counter() - t0, "tokens": sum(len(i) for i, _ in data)}

    def save(self, folder, weights: Optional[dict] = None) -> None:
        """Write the adapter in peft's format: the peft model's current LoRA weights, or
        ``weights`` (a peft state dict, as ``train_many`` returns) loaded into it first."""
        if weights is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, weights)
        self.model.save_pretrained(str(folder))

    _KEY = re.compile(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_([AB])\.weight$")

    def train_many(self, docs: list[list[Sequence]], runner,
                   tokens_per_call: Callable[[], int] = lambda: 4096) -> list[tuple[dict, dict]]:
        """Train one adapter per document (a list of its sequences), all at once.

        ``runner``: anything with ``lora_losses(ids, packed_sequences)``, here the engine's
        ``LlamaRunner`` over the served weights (never modified).
        Step j of an epoch feeds sequence j of every document; a step is cut into pieces
        of at most ``tokens_per_call()`` tokens (read before each step, so a server can ask
        for short pieces while requests are live), each piece one ``run`` call whose
        gradients accumulate, the optimiser stepping after the last. Returns, per document,
        (its peft state dict, stats).
        """
        t0 = time.perf_counter()
        scale = self.recipe.alpha / self.recipe.rank
        data = [[encode(self.tokenizer, s) for s in seqs] for seqs in docs]
        params: list[dict] = []  # per document: peft key -> trainable tensor
        deltas: list[dict] = []  # per document: (layer, projection) -> (A, B)
        for _ in docs:
            p = {k: v.detach().clone().requires_grad_(True) for k, v in self._init.items()}
            d: dict = {}
            for k, v in p.items():
                m = self._KEY.search(k)
                if m is None:
                    raise ValueError(f"unexpected adapter tensor {k}")
                li, proj, which = int(m.group(1)), m.group(2), m.group(3)
                a, b = d.get((li, proj), (None, None))
                d[(li, proj)] = (v, b) if which == "A" else (a, v)
            params.append(p)
            deltas.append(d)
        opt = torch.optim.AdamW([t for p in params for t in p.values()], lr=self.recipe.lr, weight_decay=0.0)
        losses: list[list[float]] = [[] for _ in docs]

        def piece(items: list[int], j: int, last: bool) -> list[float]:
            ids, segs, start = [], [], 0
            for k in items:
                x, labels = data[k][j]
                segs.append(PackedSequence(start, len(x), labels, deltas[k], scale))
                ids.append(x)
                start += len(x)
            per_seq = runner.lora_losses(torch.cat(ids), segs)
            per_seq.sum().backward()
            if last:
                opt.step()
                opt.zero_grad(set_to_none=True)
            return per_seq.detach().tolist()

        steps = max((len(d) for d in data), default=0)
        for _ in range(self.recipe.epochs):
            for j in range(steps):
                items = [k for k in range(len(docs)) if j < len(data[k])]
                budget, pieces, cur, n = max(1, tokens_per_call()), [], [], 0
                for k in items:  # a sequence longer than the budget goes alone
                    size = len(data[k][j][0])
                    if cur and n + size > budget:
                        pieces.append(cur)
                        cur, n = [], 0
                    cur.append(k)
                    n += size
                pieces.append(cur)
                for pi, its in enumerate(pieces):
                    got = self.run(lambda its=its, j=j, last=pi == len(pieces) - 1: piece(its, j, last))
                    for k, loss in zip(its, got):
                        losses[k].append(loss)
        elapsed = time.perf_counter() - t0
        out = []
        for k, seqs in enumerate(data):
            n = len(seqs)
            stats = {"steps": len(losses[k]), "first_loss": losses[k][0] if losses[k] else None,
                     "last_epoch_loss": sum(losses[k][-n:]) / n if n else None,
                     "train_s": elapsed / len(docs), "trained_with": len(docs),
                     "tokens": sum(len(i) for i, _ in seqs)}
            out.append(({k: v.detach() for k, v in params[k].items()}, stats))
        return out

    @torch.inference_mode()
    def answer_logprob(self, question: str, answer: str, with_adapter: bool = True) -> float:
        """Mean log-probability per token of ``answer`` after ``question`` (for measurement)."""
        ids, labels = encode(self.tokenizer, Sequence(question, answer))
        ctx = self.model.disable_adapter() if not with_adapter else _null()
        with ctx:
            logits = self.model(input_ids=ids[None].to(self.model.device)).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1).cpu()
        tgt = labels[1:]
        mask = tgt != -100
        return float(lp[mask].gather(1, tgt[mask][:, None]).mean())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
