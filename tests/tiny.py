"""A tiny random Llama and a byte-level tokenizer, built in-process (no files, no hub)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({ch: i + len(SPECIALS) for i, ch in enumerate(alphabet)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=SPECIALS)
    tok.chat_template = CHATML
    return tok


def tiny_model(seed: int = 0, vocab_size: int = 259, layers: int = 2, std: float = 0.3,
               max_positions: int = 2048) -> LlamaForCausalLM:
    """Weights drawn wide (std 0.3) so that top-2 logit gaps exceed float noise."""
    return tiny_model_of("llama", seed, std, vocab_size=vocab_size, num_hidden_layers=layers,
                         max_position_embeddings=max_positions)


def tiny_model_of(model_type: str, seed: int = 0, std: float = 0.3, **config):
    """A tiny random Llama, Qwen2 (biases on q/k/v, drawn wide too) or Mistral: 64 wide,
    4 heads over 2 KV heads, 2 layers, weights drawn with ``std``; ``config`` overrides."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[model_type]
    cfg = config_cls(**{**dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                               tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0),
                        **config})
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 or name.endswith("bias"):
                p.normal_(0.0, std)
    return model


def tiny_model_folder(path):
    """The tiny model and tokenizer saved as a model folder at ``path`` (for code that loads
    from a folder: ``TorchEngine.from_folder``, ``--model``); returns ``path``."""
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_engine(limits=None, seed: int = 0, layers: int = 2):
    from server.engine.torch_engine import TorchEngine
    from server.engine.types import WorkerLimits

    return TorchEngine(tiny_model(seed, layers=layers), tiny_tokenizer(), model_id="tiny-llama",
                       limits=limits or WorkerLimits())
