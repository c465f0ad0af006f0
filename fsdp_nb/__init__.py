"""fsdp_nb"""
