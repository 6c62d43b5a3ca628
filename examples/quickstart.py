"""Scatter in one page: publish, call, pin, map, roll back, handle errors.

Run it with a node at ``SCATTER_ADDRESS`` (``scatter node start --background`` starts
one), or with none: the first call starts one in the background and says so::

    python examples/quickstart.py
"""

from __future__ import annotations

from dataclasses import dataclass

import scatter


@dataclass
class Order:
    item: str
    quantity: int
    unit_price: float


@scatter.scatter
def order_total(order: Order, discount: float = 0.0) -> float:
    """The price of an order, after a discount between 0 and 1."""
    return round(order.quantity * order.unit_price * (1 - discount), 2)


# A callable with order_total's signature and docstring, validated before it is sent.
total = scatter.make_callable("order_total")
print(total(Order("tea", 3, 4.5)))  # 13.5
print(total(Order("tea", 3, 4.5), discount=0.1))  # 12.15
first = scatter.current_version("order_total")


# Publishing under the same name makes a new version; callers follow the current one.
@scatter.scatter(name="order_total")
def order_total_with_tax(order: Order, discount: float = 0.0) -> float:
    """The price of an order, after a discount between 0 and 1, with 20% tax."""
    return round(order.quantity * order.unit_price * (1 - discount) * 1.2, 2)


print(total(Order("tea", 3, 4.5)))  # 16.2: same signature, so the callable moves along

# A pinned callable keeps running the version it names.
pinned = scatter.make_callable("order_total", version=first)
print(pinned(Order("tea", 3, 4.5)))  # 13.5

for info in scatter.versions("order_total"):
    mark = "*" if info.current else " "
    print(f"{mark} v{info.version} {info.content_id[:12]} {info.signature_text}")

# Arguments are checked against the annotations, on this side and again on the node.
try:
    total(Order("tea", "three", 4.5))  # type: ignore[arg-type]
except scatter.ValidationError as exc:
    print("rejected:", exc)

# Wrong arity is Python's own TypeError, worded as for a local call.
try:
    total()
except TypeError as exc:
    print("rejected:", exc)


@scatter.scatter
def parse_quantity(text: str) -> int:
    return int(text)


# An exception inside the function comes back as RemoteError; the node keeps serving.
try:
    scatter.make_callable("parse_quantity")("a dozen")
except scatter.RemoteError as exc:
    print("remote:", exc.remote_type, exc.remote_message)

# Many calls at once: spread over the node's workers, results in order.
orders = [Order("tea", n, 4.5) for n in range(1, 6)]
print(list(total.map(orders)))  # [5.4, 10.8, 16.2, 21.6, 27.0]

# Roll back to the version before the tax, then clean up.
print("current after rollback:", scatter.rollback("order_total"))
print(total(Order("tea", 3, 4.5)))  # 13.5
scatter.vaporize("order_total")
scatter.vaporize("parse_quantity")

try:
    scatter.make_callable("order_total")
except scatter.FunctionNotFound as exc:
    print("gone:", exc)
