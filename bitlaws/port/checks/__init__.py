"""Per-fixture parity checks used by `python -m bitlaws.port.verify`.

Each module ``bitlaws.port.checks.<fixture>`` (``vqvae``, ``var``, ``dit``, ``sdvae``, ``fid``) defines
``check(folder: pathlib.Path, manifest: dict) -> list[Comparison]``: it builds our model from the
fixture's constructor arguments (``manifest["fixtures"][<fixture>]["ctor"]``), loads the stored weights
or regenerates them from the recipe, runs the same calls as upstream and compares every output array.
"""
