"""The pure, transport-free core: state machines that take messages and "now" in and give values out."""
