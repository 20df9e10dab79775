"""tokenpool.models"""
