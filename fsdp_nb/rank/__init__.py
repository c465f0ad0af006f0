"""The rank side: the spawned worker loop, running cells, capturing output, events.

Nothing here imports the kernel side (`fsdp_nb.session`), except the messages of
`fsdp_nb.session.protocol`, which both sides share.
"""
