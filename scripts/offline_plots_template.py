"""Write .dvc/plots/offline.html: DVC's plots page template with vega, vega-lite and vega-embed inlined.

  make plots-template          (npm pack of the three pinned packages, then this script)

DVC's own page loads the three libraries from a CDN, so `dvc plots show` and `dvc plots diff`
give a blank page offline. `.dvc/config` points `plots.html_template` at this file instead.
The versions are the ones DVC's page asks for (dvc-render's vega.py); all three are BSD-3-Clause,
(c) University of Washington Interactive Data Lab, and their licence travels in the file.
"""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

PACKAGES = {"vega": ("5.20.2", "build/vega.min.js"), "vega-lite": ("5.2.0", "build/vega-lite.min.js"),
            "vega-embed": ("6.18.2", "build/vega-embed.min.js")}
OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "offline.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>resnorm: DVC plots</title>
    <!-- vega-embed's libraries inlined (no network): %s.
         Their licences (BSD-3-Clause):
%s
    -->
    <script>
        // What went wrong on the page, kept in the root element's data-page-errors for the browser test
        // (tests/test_pipeline.py): uncaught errors, rejected promises, console.error, and
        // scripts or images that failed to load. Empty on a good page.
        window.pageErrors = [];
        function notePageError(message) {
            pageErrors.push(String(message));
            document.documentElement.setAttribute("data-page-errors", JSON.stringify(pageErrors));
        }
        window.addEventListener("error", function (e) {
            notePageError(e.message || "failed to load " + (e.target && (e.target.src || e.target.href)));
        }, true);
        window.addEventListener("unhandledrejection", function (e) { notePageError("unhandled: " + e.reason); });
        var consoleError = console.error;
        console.error = function () { notePageError(Array.from(arguments).join(" ")); consoleError.apply(console, arguments); };
    </script>
%s
    <style>
        body { font-family: sans-serif; margin: 16px; }
        table { border-spacing: 15px; }
        img { max-width: 100%%; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def library(tgz: Path, member: str) -> str:
    with tarfile.open(tgz) as tar:
        js = tar.extractfile(f"package/{member}").read().decode()
    js = "\n".join(line for line in js.splitlines() if not line.startswith("//# sourceMappingURL="))
    for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):      # would break the page or DVC's fill-in
        if bad in js:
            sys.exit(f"{tgz}: contains {bad!r}; cannot inline it")
    return js


def main(folder: str) -> None:
    names, scripts, licence = [], [], []
    for name, (version, member) in PACKAGES.items():
        tgz = Path(folder) / f"{name}-{version}.tgz"
        if not tgz.is_file():
            sys.exit(f"{tgz}: missing; run `npm pack {name}@{version}` in {folder}")
        names.append(f"{name} {version}")
        scripts.append(f"    <script>\n{library(tgz, member)}\n    </script>")
        with tarfile.open(tgz) as tar:             # "--" may not appear inside an HTML comment
            licence += [f"{name} {version}:", *tar.extractfile("package/LICENSE").read().decode()
                        .replace("--", "- -").splitlines(), ""]
    text = PAGE % (", ".join(names), "\n".join(("         " + line).rstrip() for line in licence),
                   "\n".join(scripts))
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf8")
    tmp.replace(OUT)
    print(f"{OUT}: {len(text) / 1e6:.2f} MB ({', '.join(names)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
