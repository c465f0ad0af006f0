"""`python -m fsdp_nb.attach --session HOST:PORT --key-file F`: the program torchrun runs on each node
to attach its ranks to a notebook's session (`%fsdp_launch --listen`, `Session.listen`).

A module of its own so that the command reads as what it does; the rank side lives in
fsdp_nb/rank/attached.py.
"""

from __future__ import annotations

if __name__ == "__main__":
    from fsdp_nb.rank.attached import main

    main()
