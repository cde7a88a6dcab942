"""The demo model's components, built offline from configs: word-level tokenizers over the caption grammar, small
CLIP and T5 text encoders, a small ``AutoencoderKL`` and a small ``FluxTransformer2DModel``, assembled into an
ordinary ``FluxPipeline``.

Shapes (at 128x128): VAE 8x downsampling -> 16x16x4 latents -> packed 2x2 by FluxPipeline into 64 tokens of
16 channels. Text: T5 states (32 tokens x 128) feed the joint attention; the CLIP pooled output (64) feeds the
timestep/text modulation, like FLUX.1's T5-XXL + CLIP-L.
"""

from __future__ import annotations

import string

from .data import IMAGE_SIZE, PUNCTUATION, VOCABULARY

TEXT_LEN = 32  # tokens for both tokenizers == FluxPipeline's max_sequence_length for this model
# Caption styles a model can be trained on: (its tokenizers' words, its text length). "plain": the paraphrases of
# data.paraphrase (over 20 000 of them: at most 45 T5 tokens, 6 % over 32; the grammar's captions: at most 21).
CAPTION_STYLES = ("grammar", "plain")
PLAIN_TEXT_LEN = 48


def caption_style(captions: str) -> tuple[tuple[str, ...], int]:
    """The vocabulary and text length of a caption style."""
    if captions == "grammar":
        return VOCABULARY, TEXT_LEN
    if captions == "plain":
        from .data import paraphrase_vocabulary

        return paraphrase_vocabulary("train"), PLAIN_TEXT_LEN
    raise ValueError(f"unknown caption style {captions!r}; choose one of {CAPTION_STYLES}")
T5_DIM = 128  # T5 d_model == transformer joint_attention_dim (the T5 binds colours to positions: the wider one)
CLIP_DIM = 64  # CLIP hidden == pooled_projection_dim
LATENT_CHANNELS = 4
VAE_CHANNELS = (16, 32, 64, 64)  # 4 levels -> vae_scale_factor 8

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=4 * LATENT_CHANNELS,  # FluxPipeline packs 2x2 latent patches into one token
    num_layers=2,  # double-stream blocks
    num_single_layers=4,
    # Text tokens sit at RoPE position 0 (FluxPipeline's txt_ids are zeros), so an image token finds "its" cell
    # words through the rotation of its query alone. With 12 RoPE dims per axis (theta 10000) only ~1.5 of the
    # frequencies vary over the 8 token rows; 30 dims per axis give ~5, hence 2 heads of 64 rather than 4 of 32.
    attention_head_dim=64,
    num_attention_heads=2,  # inner dim 128
    joint_attention_dim=T5_DIM,
    pooled_projection_dim=CLIP_DIM,
    guidance_embeds=False,  # not guidance-distilled: true CFG (true_cfg_scale + negative_prompt) instead
    axes_dims_rope=(4, 30, 30),  # (image index: always 0 for text-to-image, row, column)
)

_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def build_t5_tokenizer(vocabulary: tuple[str, ...] = VOCABULARY, text_len: int = TEXT_LEN):
    """Unigram T5 tokenizer whose pieces are the caption words (one token each), with single characters as a
    fallback so that any prompt tokenizes."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -8.0)]
    vocab += [("\u2581" + w, -1.0) for w in vocabulary]
    vocab += [(p, -1.0) for p in PUNCTUATION]
    vocab += [(c, -10.0) for c in _CHARS if c not in PUNCTUATION]
    vocab += [("\u2581" + c, -9.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=text_len)


def build_clip_tokenizer(vocabulary: tuple[str, ...] = VOCABULARY, text_len: int = TEXT_LEN):
    """CLIP BPE tokenizer whose merges assemble each caption word into one token (``word</w>``)."""
    from transformers import CLIPTokenizer

    # Learn BPE merges on the vocabulary itself (most frequent pair first, until every word is one symbol):
    # applying merges in rank order then reproduces exactly this segmentation, one token per word.
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in vocabulary]
    tokens: list[str] = [t for c in _CHARS for t in (c, c + "</w>")]
    merges: list[tuple[str, str]] = []
    while any(len(w) > 1 for w in words):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(best)
        tokens.append(best[0] + best[1])
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i: i + 2] = [w[i] + w[i + 1]]
                i += 1
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=text_len)


def one_token_per_word(tokenizer, caption: str) -> bool:
    """What both tokenizers are built for: each caption word (and comma) is a single token."""
    return len(tokenizer.tokenize(caption)) == len(caption.replace(",", " ,").split())


def build_text_encoders(clip_vocab_size: int, t5_vocab_size: int, clip_eos_id: int, clip_bos_id: int,
                        text_len: int = TEXT_LEN):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab_size, hidden_size=CLIP_DIM, intermediate_size=4 * CLIP_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=text_len, hidden_act="gelu", projection_dim=CLIP_DIM,
        bos_token_id=clip_bos_id, eos_token_id=clip_eos_id, pad_token_id=clip_eos_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab_size, d_model=T5_DIM, d_kv=32, d_ff=2 * T5_DIM, num_layers=3, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=text_len, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    ))
    return clip, t5


def build_vae():
    from diffusers import AutoencoderKL

    n = len(VAE_CHANNELS)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=VAE_CHANNELS, layers_per_block=1,
        latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
        # few groups: with ~1 channel per group, GroupNorm acts as InstanceNorm and erases flat colours (measured)
        norm_num_groups=2,
        # set from the data's latent statistics after training (train.py)
        scaling_factor=1.0, shift_factor=0.0,
    )


def build_transformer(**overrides):
    """``overrides``: config keys to change (the training recipes set the block counts); None keeps the default."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**dict(TRANSFORMER_CONFIG, **{k: v for k, v in overrides.items() if v is not None}))


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Linear sigmas 1 -> 1/N (shift 1, no resolution-dependent shift): the same t the model was trained on.
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def build_components(captions: str = "grammar", **transformer_overrides) -> dict:
    """Fresh components; ``captions``: the caption style the tokenizers and text encoders are built for."""
    vocabulary, text_len = caption_style(captions)
    clip_tok, t5_tok = build_clip_tokenizer(vocabulary, text_len), build_t5_tokenizer(vocabulary, text_len)
    clip, t5 = build_text_encoders(len(clip_tok), len(t5_tok), clip_tok.eos_token_id, clip_tok.bos_token_id,
                                   text_len)
    return dict(tokenizer=clip_tok, tokenizer_2=t5_tok, text_encoder=clip, text_encoder_2=t5, vae=build_vae(),
                transformer=build_transformer(**transformer_overrides), scheduler=build_scheduler())


def assemble_pipeline(components: dict):
    from diffusers import FluxPipeline

    return FluxPipeline(image_encoder=None, feature_extractor=None, **components)

