"""remote.redact: the credentials of data URLs never reach a log line."""

from sd.data.remote import redact


def test_userinfo_and_query_values_are_hidden_and_the_file_still_named():
    assert redact("https://user:secret@host/x.tar") == "https://***:***@host/x.tar"
    assert redact("https://ghp_TOKEN@example.org:8443/a/b.tar") == "https://***@example.org:8443/a/b.tar"
    presigned = ("https://bucket.s3.amazonaws.com/laion/00001.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                 "&X-Amz-Credential=AKIAEXAMPLE%2F20261206%2Fus-east-1&X-Amz-Signature=deadbeef"
                 "&X-Amz-Security-Token=FwoGZX")
    assert redact(presigned) == ("https://bucket.s3.amazonaws.com/laion/00001.tar?X-Amz-Algorithm=***"
                                 "&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***")
    assert redact("s3://bucket/p/x.tar?token=zz&flag") == "s3://bucket/p/x.tar?token=***&flag"
    assert redact("HTTP://u:p@h/x?sig=a,b)#part") == "HTTP://***:***@h/x?sig=***#part"


def test_urls_inside_messages_are_redacted_and_the_rest_kept():
    message = ("file https://u:pw1@h:81/d/x.tar (listed in s3://b/l.filelist?token=t2) cannot be reached "
               "(ClientResponseError: 404, url=URL('http://u:pw1@h:81/d/x.tar?key=k3'))")
    out = redact(message)
    assert not any(secret in out for secret in ("pw1", "t2", "k3"))
    assert out == ("file https://***:***@h:81/d/x.tar (listed in s3://b/l.filelist?token=***) cannot be reached "
                   "(ClientResponseError: 404, url=URL('http://***:***@h:81/d/x.tar?key=***'))")


def test_local_paths_and_clean_urls_are_unchanged_and_redaction_is_idempotent():
    for text in ("/data/user:pw@host/part-000001", "./parts/a?b=c", "http://127.0.0.1:8000/parts/part-000001.gz",
                 "s3://bucket/laion_shards/00000.tar", "no URL here"):
        assert redact(text) == text
    once = redact("https://u:p@h/x?token=t")
    assert redact(once) == once
