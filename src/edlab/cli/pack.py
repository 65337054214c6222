"""edlab pack -> edlab.pack.pack."""

import click

from ._common import echo_json


@click.command()
@click.argument("checkpoint")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The packed file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the sizes as JSON.")
def pack(checkpoint, out, as_json):
    """Write a deployment file that holds what the score counts, and nothing else.

    k-bit weights as packed integers with their steps, binary weights as bits, pruned weights as a bitmask
    plus the nonzeros, BN folded to its scale and shift, the rest in the dtype the score charges. edlab
    eval, score, bench and info (and edlab.load_checkpoint) read it and give the outputs of the checkpoint.

    \b
    Example:
      edlab pack runs/r20-qat4/model.ckpt --out r20-qat4.pack
      edlab score r20-qat4.pack && edlab eval r20-qat4.pack
    """
    from ..pack import pack as pack_file
    from ..runs import resolve_model_path

    checkpoint = resolve_model_path(checkpoint)
    r = pack_file(checkpoint, out)
    if as_json:
        echo_json(r)
        return
    parts = " + ".join(f"{k} {r[k]:,}" for k in ("header", "weights", "values", "other") if r.get(k))
    counted = r["counted"]
    click.echo(f"packed {checkpoint} -> {r['out']}: {r['file']:,} bytes = {parts}" +
               (f" + mask {r['mask']:,}" if r.get("mask") else ""))
    body = r["file"] - r["header"] - r.get("mask", 0)
    click.echo(f"the score's parameter term counts {counted:,.0f} bytes (nonzero entries x bits / 8); the file "
               f"holds {body:,} bytes of tensors ({100 * (body / counted - 1):+.1f} %) besides its header" +
               (" and the bitmask of pruned positions, which the course rules do not charge" if r.get("mask")
                else ""))
