"""Everything a notebook shows: the live panel (`panel.py`, read first; one observer of a run, HTML from
`render.py`), the sweep panel, the method picker, and the HTML views of the engine's objects (comparison,
predictions, run tables, cross-validation, sweep snapshot, batch preview), registered as IPython formatters
by class name (`formatters.py`). Views take the objects' plain data; HTML never lives in the engine.

May import: ipywidgets, IPython, and everything below (the engine, config, data). Nothing imports it but the
top layer (nbtune/__init__.py, api.py, magics).
"""
