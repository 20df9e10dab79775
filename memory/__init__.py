"""tokenpool.memory"""
