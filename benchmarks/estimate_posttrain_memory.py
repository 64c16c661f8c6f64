"""ESTIMATE (not a measurement) of the peak GPU memory of a stage-1B (post-training) step.

Example:
    python benchmarks/estimate_posttrain_memory.py --preset flowmo-lo --batch_size 8 4 --posttrain_k 8

How: the activation memory that autograd keeps for backward is counted exactly, with
`torch.autograd.graph.saved_tensors_hooks`, for ONE decoder block and for the decoder's input/output layers, at
the preset's width and resolution, batch 1, under bf16 autocast (on this machine's device; CPU works, autocast's op
lists on CPU and CUDA differ slightly). Saved bytes grow linearly with the batch (attention saves its output and
log-sum-exp, not the score matrix), so they are scaled to `--batch_size`. These counts are then composed with the
parameter and optimizer memory:

    weights (fp32, encoder + decoder) + decoder gradients (fp32) + Adam moments (2 x fp32, decoder)
    + bf16 weight copies cached by autocast for the trained decoder
    + activations of the stage-1A decoder forward (not checkpointed: all blocks)
    + stage-1B chain, `call` checkpointing (the original): per step only its inputs are kept; in backward one whole
      decoder call is recomputed, so one more full decoder forward's activations are alive at once
      `block` checkpointing: every block input of every step is kept; one block is recomputed at a time
    + perceptual network activations (ResNet-50 at 224x224, measured the same way; random weights)

Not counted: the CUDA caching allocator's fragmentation and workspace (cuBLAS, flash-attention), the gradients
flowing through the chain (a few activations of one block at a time), temporary buffers inside kernels. Real peaks
are typically 10-30% above such an estimate; measure with `benchmark_flowmo.py --what train_step --stages 1b`.
"""

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_utils as common  # noqa: E402

from flowmo_diffusers import FlowMoModel, get_preset_config  # noqa: E402


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs (parameters excluded)."""
    storages: Dict[int, int] = {}
    parameters = set()

    def pack(tensor):
        if isinstance(tensor, torch.nn.Parameter) or tensor.data_ptr() in parameters:
            return tensor
        grad_fn = tensor.grad_fn
        if grad_fn is not None and type(grad_fn).__name__ == "ToCopyBackward0":
            sources = [f for f, _ in grad_fn.next_functions if f is not None]
            if sources and all(type(f).__name__ == "AccumulateGrad" for f in sources):
                return tensor  # autocast's low-precision copy of a weight: counted as the weight cache instead
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def unpack(tensor):
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        fn(parameters)
    return sum(storages.values())


def measure_decoder_parts(config: Dict[str, Any], resolution: int, device: str, dtype: str) -> Dict[str, int]:
    """Saved-for-backward bytes at batch 1: one (non-final) decoder block, and the rest of the decoder."""
    one_block = dict(config, decoder_depth=2, encoder_depth=1)
    torch.manual_seed(0)
    model = FlowMoModel(**one_block).to(device)
    model.encoder.requires_grad_(False)
    images = torch.rand(1, 3, resolution, resolution, device=device) * 2 - 1
    with torch.no_grad():
        code = model.encode(images).code
    rotary_emb = model.decoder_rotary_embedding(resolution, resolution, device)
    times = torch.full((1,), 0.5, device=device)

    def full(params):
        params.update(p.data_ptr() for p in model.parameters())
        with common.autocast_context(device, dtype):
            model(images, times, code, rotary_emb=rotary_emb).sample.float().sum()

    total_two_blocks = saved_bytes(full)
    patches = None

    def first_block_only(params):
        nonlocal patches
        params.update(p.data_ptr() for p in model.parameters())
        decoder = model.decoder
        with common.autocast_context(device, dtype):
            from flowmo_diffusers.models.transformer_flowmo import patchify

            patch_states = decoder.patch_embed(patchify(images, config["patch_size"]).detach()).detach()
            condition = torch.cat([code, torch.ones_like(code[..., :1])], dim=-1)
            code_states = decoder.code_embed(condition).detach()
            temb = decoder.timestep_embedding(times, patch_states.dtype).detach()
            decoder.blocks[0](code_states.requires_grad_(), patch_states.requires_grad_(), temb, rotary_emb)

    block = saved_bytes(first_block_only)
    # Two blocks = block 0 (full) + block 1 (final: its code stream is attention-only) + input/output layers.
    return {"block": block, "decoder_two_blocks": total_two_blocks}


def measure_resnet50(device: str, dtype: str, resolution: int) -> Optional[int]:
    try:
        from flowmo_diffusers.training.perceptual import build_perceptual_loss

        network = build_perceptual_loss("resnet50", pretrained=False).to(device)
    except Exception as error:  # noqa: BLE001
        print(f"ResNet-50 not available ({type(error).__name__}); its activations are left out")
        return None
    images = torch.rand(1, 3, resolution, resolution, device=device) * 2 - 1
    prediction = images.clone().requires_grad_()

    def run(params):
        params.update(p.data_ptr() for p in network.parameters())
        with common.autocast_context(device, dtype):
            network(images, prediction).sum()

    return saved_bytes(run)


def estimate(args) -> List[Dict[str, Any]]:
    config = get_preset_config(args.preset)
    resolution = args.resolution or config["sample_size"]
    parts = measure_decoder_parts(config, resolution, args.device, args.dtype)
    resnet = measure_resnet50(args.device, args.dtype, resolution) or 0
    depth = config["decoder_depth"]
    # decoder forward (all blocks) at batch 1: the two-block count plus (depth - 2) full blocks.
    decoder_forward = parts["decoder_two_blocks"] + (depth - 2) * parts["block"]
    with torch.device("meta"):
        model = FlowMoModel(**config)
    n_encoder = sum(p.numel() for p in model.encoder.parameters())
    n_decoder = sum(p.numel() for p in model.decoder.parameters())
    tokens = config["code_length"] + (resolution // config["patch_size"]) ** 2
    act_bytes = 2 if args.dtype == "bf16" else 4
    block_input = tokens * config["decoder_hidden_size"] * act_bytes  # a block's code + image stream states
    print(
        f"counted on {args.device} under {args.dtype} autocast: one decoder block saves "
        f"{parts['block'] / 2**20:.1f} MiB per image for backward; a full decoder forward "
        f"{decoder_forward / 2**30:.2f} GiB per image; ResNet-50 at 224x224 {resnet / 2**20:.1f} MiB per image"
    )
    records = []
    for batch in args.batch_size:
        for scheme in args.posttrain_checkpointing:
            terms = {
                "weights fp32 (encoder + decoder)": 4 * (n_encoder + n_decoder),
                "decoder gradients fp32": 4 * n_decoder,
                "Adam moments fp32 (decoder)": 8 * n_decoder,
                "autocast bf16 weight cache (decoder)": 2 * n_decoder if args.dtype == "bf16" else 0,
                "perceptual ResNet-50 activations (2 images)": 2 * batch * resnet,
                "chain noise / step inputs": batch * args.posttrain_k * 3 * resolution * resolution * 4,
            }
            if scheme == "call":
                # The stage-1A forward is not checkpointed; each chain step keeps only its inputs, and backward
                # recomputes one whole decoder call at a time.
                terms["stage-1A decoder forward activations"] = batch * decoder_forward
                terms["one recomputed decoder call (backward)"] = batch * decoder_forward
            else:
                # enable_gradient_checkpointing: every decoder forward of the step (stage 1A and the k chain steps)
                # keeps its block inputs; backward recomputes one block at a time.
                terms["block inputs kept (stage-1A forward + all steps)"] = (
                    batch * (args.posttrain_k + 1) * depth * block_input
                )
                terms["one recomputed block (backward)"] = batch * parts["block"]
            total = sum(terms.values())  # every term alive at once: an upper-leaning sum
            print()
            print(
                f"ESTIMATE, not a measurement: stage-1B step, {args.preset}, {resolution}x{resolution}, micro-batch "
                f"{batch}, k={args.posttrain_k}, {args.dtype} autocast, '{scheme}' checkpointing"
            )
            rows = [[name, common.gib(value)] for name, value in terms.items()]
            rows.append(["total (estimate)", common.gib(total)])
            print(common.markdown_table(["term", "bytes"], rows))
            records.append(
                dict(
                    benchmark="estimate_posttrain_memory",
                    kind="estimate (not a measurement)",
                    preset=args.preset,
                    resolution=resolution,
                    batch_size=batch,
                    posttrain_k=args.posttrain_k,
                    dtype=args.dtype,
                    posttrain_checkpointing=scheme,
                    terms_bytes=terms,
                    total_bytes=total,
                    block_saved_bytes_per_image=parts["block"],
                    decoder_forward_saved_bytes_per_image=decoder_forward,
                    resnet50_saved_bytes_per_image=resnet,
                    counted_on=args.device,
                    environment=common.environment(args.device),
                )
            )
    return records


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="flowmo-lo", choices=["flowmo-tiny", "flowmo-lo", "flowmo-hi"])
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch_size", type=int, nargs="+", default=[8], help="micro-batch size(s)")
    parser.add_argument("--posttrain_k", type=int, default=8)
    parser.add_argument("--posttrain_checkpointing", nargs="+", default=["call", "block"], choices=["call", "block"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=os.path.join(common.RESULTS_DIR, "estimate_posttrain_memory.jsonl"))
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    records = estimate(args)
    common.record(records, args.output)
    return records


if __name__ == "__main__":
    main()
