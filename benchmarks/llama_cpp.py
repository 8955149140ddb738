"""llama.cpp (through llama-cpp-python) as a runner of `benchmarks/llm.py`.

`write_gguf` converts a transformers Llama or Qwen2 model to a GGUF file with the `gguf`
package, the way llama.cpp's convert_hf_to_gguf.py does (same metadata keys and tensor names;
Llama's q/k rows permuted to llama.cpp's rope layout), with a placeholder vocabulary of
`vocab_size` tokens (the benchmark feeds token ids, never text). q8_0 and q4_0 are made from
the f32 file by llama.cpp's own quantizer (`llama_model_quantize`, its default mix of types,
as `llama-quantize` would). `LlamaCppRunner` loads the file and greedy-decodes token ids.

    python -m benchmarks.llama_cpp      # check: f32 GGUF against transformers (logits, tokens)

The f32 file's first-token logits differ from transformers' by ~1e-3 (of logits up to ~3): the
f16 KV cache llama.cpp keeps by default; with an f32 one (type_k=type_v=0) by ~3e-6.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
import tempfile
import weakref
from collections import Counter
from typing import Any

import numpy as np
import torch

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def _lib() -> Any:
    """The `llama_cpp` package (this file's name shadows it where benchmarks/ is on sys.path,
    as under `python benchmarks/llm.py`)."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        import llama_cpp
    finally:
        sys.path[:] = saved
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's INFO lines
    return llama_cpp


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows to llama.cpp's interleaved rope pairs
    (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _rope_theta(config: Any) -> float:
    # transformers 5: rope_parameters (rope_scaling is its alias); 4.x: rope_theta, rope_scaling
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise NotImplementedError(f"rope scaling {params} not converted")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def write_gguf(model: torch.nn.Module, path: str | os.PathLike, outtype: str = "f32") -> None:
    """Write `model` (transformers LlamaForCausalLM or Qwen2ForCausalLM) to a GGUF file:
    `outtype` f32, or q8_0 / q4_0 (llama.cpp's quantizer on the f32 file)."""
    import gguf

    path = os.fspath(path)
    if outtype != "f32":
        if outtype not in FTYPES:
            raise ValueError(f"outtype {outtype!r}: f32, {', '.join(FTYPES)}")
        f32 = path + ".f32.tmp"
        try:
            write_gguf(model, f32, "f32")
            quantize(f32, path, outtype)
        finally:
            if os.path.exists(f32):
                os.remove(f32)
        return
    arch = ARCHS.get(type(model).__name__)
    if arch is None:
        raise NotImplementedError(f"{type(model).__name__}: only {', '.join(ARCHS)}")
    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    if getattr(config, "mlp_bias", False) or getattr(config, "use_sliding_window", False):
        raise NotImplementedError("mlp_bias / sliding window attention not converted")
    if config.hidden_act != "silu":
        raise NotImplementedError(f"hidden_act {config.hidden_act}")

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"graphopt-benchmark-{arch}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    # A placeholder sentencepiece vocabulary laid out as Llama 2's: <unk> <s> </s>, the 256
    # byte tokens, then "t<id>" for the rest. Only its size matters: ids go in and come out.
    n_vocab = config.vocab_size
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(len(tokens), n_vocab)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (n_vocab - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens[:n_vocab])
    writer.add_token_scores([-float(i) for i in range(n_vocab)])
    writer.add_token_types(types[:n_vocab])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

    def add(name: str, t: torch.Tensor) -> None:
        writer.add_tensor(name, t.detach().to(torch.float32).contiguous().numpy())

    body = model.model
    add("token_embd.weight", body.embed_tokens.weight)
    for i, layer in enumerate(body.layers):
        attn, mlp, blk = layer.self_attn, layer.mlp, f"blk.{i}"
        add(f"{blk}.attn_norm.weight", layer.input_layernorm.weight)
        for proj, short, heads in (("q", "q", n_head), ("k", "k", n_kv), ("v", "v", None)):
            linear = getattr(attn, f"{proj}_proj")
            for kind in ("weight", "bias"):
                t = getattr(linear, kind)
                if t is None:
                    continue
                if arch == "llama" and heads is not None:  # qwen2 is NEOX rope: HF's layout
                    t = _permute(t.detach(), heads)
                add(f"{blk}.attn_{short}.{kind}", t)
        if attn.o_proj.bias is not None:
            raise NotImplementedError("o_proj bias not converted")
        add(f"{blk}.attn_output.weight", attn.o_proj.weight)
        add(f"{blk}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        add(f"{blk}.ffn_gate.weight", mlp.gate_proj.weight)
        add(f"{blk}.ffn_up.weight", mlp.up_proj.weight)
        add(f"{blk}.ffn_down.weight", mlp.down_proj.weight)
    add("output_norm.weight", body.norm.weight)
    if model.lm_head.weight is not body.embed_tokens.weight:  # tied: llama.cpp reuses token_embd
        add("output.weight", model.lm_head.weight)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: str, dst: str, outtype: str) -> None:
    """llama.cpp's quantizer (what `llama-quantize src dst Q8_0` runs), default settings."""
    lib = _lib()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, FTYPES[outtype])
    params.nthread = torch.get_num_threads()
    if lib.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize({src}, {outtype}) failed")


def tensor_table(path: str) -> dict[str, tuple[str, int]]:
    """Every tensor of a GGUF file: name -> (ggml type, bytes)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors}


class LlamaCppRunner:
    """A model written to a GGUF and loaded in llama.cpp, answering what benchmarks/llm.py
    asks of a runner: greedy `generate(ids, new)` (batch 1 only), `weight_bytes_per_token()`.
    The file lives in a temporary folder removed with the runner."""

    max_batch = 1  # llama-cpp-python's Llama decodes one sequence

    def __init__(self, model: torch.nn.Module, outtype: str, n_ctx: int) -> None:
        lib = _lib()
        self.outtype = outtype
        self.folder = tempfile.mkdtemp(prefix="graphopt-gguf-")
        weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.path = os.path.join(self.folder, f"model-{outtype}.gguf")
        write_gguf(model, self.path, outtype)
        self.tensors = tensor_table(self.path)
        # generate(min_new_tokens=new) keeps transformers from ever choosing EOS: so here too
        eos = model.generation_config.eos_token_id
        self.suppress = [eos] if isinstance(eos, int) else list(eos or [])
        threads = torch.get_num_threads()
        self.llm = lib.Llama(
            model_path=self.path,
            n_ctx=n_ctx,
            n_batch=max(512, n_ctx),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            use_mmap=False,  # weights read into memory, not paged in from the file when timed
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        types = Counter(kind.lower() for kind, _ in self.tensors.values())
        self.note = (
            f"llama-cpp-python {lib.__version__}, tensors: "
            + ", ".join(f"{n} {kind}" for kind, n in types.most_common())
            + "; b8: not run (llama-cpp-python decodes one sequence)"
        )

    def _last_logits(self) -> np.ndarray:
        lib = _lib()
        ptr = lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the token after the prompt `ids` [1, n] (a copy)."""
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return torch.from_numpy(self._last_logits().copy())

    def generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        """Greedy: `ids` [1, n] -> [1, n + new], argmax of the logits (EOS suppressed, as
        transformers' min_new_tokens does), the KV cache restarted on every call."""
        if ids.shape[0] != 1:
            raise ValueError(f"batch {ids.shape[0]}: llama-cpp-python decodes one sequence")
        out = ids[0].tolist()
        self.llm.reset()
        self.llm.eval(out)
        for i in range(new):
            logits = self._last_logits()
            if self.suppress:
                logits = logits.copy()
                logits[self.suppress] = -np.inf
            out.append(int(logits.argmax()))
            if i + 1 < new:
                self.llm.eval(out[-1:])
        return torch.tensor([out], dtype=torch.long)

    def weight_bytes_per_token(self) -> int:
        """Bytes one decode step reads: every tensor of the file but the embedding table."""
        return sum(size for name, (_, size) in self.tensors.items() if name != "token_embd.weight")


def check(name: str = "llama", new: int = 32) -> int:
    """The f32 GGUF against transformers eager: first-token logits and greedy tokens."""
    from benchmarks.llm import CACHE_LEN, PROMPT, build, generate

    model = build(name)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (1, PROMPT), generator=gen)
    with torch.no_grad():
        expected_logits = model(ids).logits[0, -1]
        expected = generate(model, ids, new)
    runner = LlamaCppRunner(model, "f32", n_ctx=CACHE_LEN)
    got_logits = runner.logits(ids)
    got = runner.generate(ids, new)
    diff = (got_logits - expected_logits).abs().max().item()
    scale = expected_logits.abs().max().item()
    same = (got[0, PROMPT:] == expected[0, PROMPT:]).float().mean().item()
    print(f"{name}: first-token logits max |diff| {diff:.3g} (max |logit| {scale:.3g}, "
          f"relative {diff / scale:.2g}); greedy tokens = eager: {same:.0%}")  # fmt: skip
    return 0 if same == 1.0 and diff / scale < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(max(check(name) for name in (sys.argv[1:] or ["llama", "qwen2"])))
