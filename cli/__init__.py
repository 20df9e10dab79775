"""tokenpool.cli"""
