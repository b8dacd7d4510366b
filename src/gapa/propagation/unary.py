"""(rules registered by this module: in progress)"""
