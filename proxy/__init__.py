"""tokenpool.proxy"""
