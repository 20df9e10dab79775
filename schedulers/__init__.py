"""tokenpool.schedulers"""
