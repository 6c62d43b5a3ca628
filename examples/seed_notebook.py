"""The seed's notebook (``seed/scatter-seed.md``), cell by cell, as a script.

The code of every cell is the seed's own, import line included. Two additions, so the
script runs from top to bottom: the cell the seed says "will fail" is wrapped in
``try``/``except TypeError`` and prints the error, and a last cell shows what calling a
vaporized function says.

Run it with a node at ``SCATTER_ADDRESS`` (default ``tcp://127.0.0.1:4242``), or with none:
the first call then starts one in the background and says so in one line::

    python examples/seed_notebook.py

Numbers start at 1 on a fresh node; on a node that has seen ``add`` before they continue
after its highest version (numbers are never reused, even after ``vaporize``).
The same cells, as a notebook: ``examples/seed_notebook.ipynb``.
"""

# The seed's code stays as the seed wrote it: its import order, its redefinition of `add`
# (that is the point of the notebook), imports in later cells.
# ruff: noqa: I001, F811, E402

# %%
from scatter.brew.core import make_callable, current_version, rollback, scatter, vaporize

num_1 = 42
num_2 = 42 * 24

# %%
@scatter
def add(a: int, b: int) -> int:
    return a + b

# %%
print("Current function version:", current_version("add"))

callable_func = make_callable("add")

print("Function call result:", callable_func(num_1, num_2))

# %%
@scatter
def add(a: int, b: int, c: int) -> int:
    return a + b + c

# %%
print("Version after updating signature:", current_version("add"))

# %%
# Updated function

callable_func = make_callable("add")
try:
    print("Updated function call result:", callable_func(num_1, num_2))  # This will fail since it now expects 3 arguments
    # print("Updated function call result:", callable_func(num_1, num_2, num_1))
except TypeError as error:
    print("TypeError:", error)

# %%
# Rollback

rollback("add")
print("Version after rollback:", current_version("add"))

# %%
# Calling rolledback function
callable_func = make_callable("add")
print("Rolled back function call result:", callable_func(num_1, num_2))

# %%
print("Deleting the function...")
vaporize("add")

# %%
# After vaporize, nothing answers to the name any more.
import scatter as scatter_api

try:
    make_callable("add")
except scatter_api.FunctionNotFound as error:
    print("FunctionNotFound:", error)
