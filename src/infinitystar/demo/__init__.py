"""`infinitystar demo`: a web page for every task of a model folder (the built-in default model unless told
otherwise). The handlers (`infinitystar.demo.handlers`) need nothing beyond the package; the page
(`infinitystar.demo.app`) needs the optional `demo` extra: `pip install -e ".[demo]"`."""
