/* End-to-end test of the volshadow C ABI, as an appliance's C code would
 * use it: images, a volume, snapshots, reads, changed extents, verify,
 * revert, delete, close and reopen, and the error paths. Every check
 * compares against bytes this program wrote. Run under AddressSanitizer
 * (or valgrind) in CI. Usage: volshadow_test [SCRATCH_DIR] */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "volshadow.h"

/* Counted only on the main thread; reader threads report through their
 * own results. */
static int passed, failed;

#define CHECK(cond)                                                           \
    do {                                                                      \
        if (cond) {                                                           \
            passed++;                                                         \
        } else {                                                              \
            failed++;                                                         \
            fprintf(stderr, "%s:%d: FAILED: %s (last error %d: %s)\n",        \
                    __FILE__, __LINE__, #cond, vs_last_error_code(),          \
                    vs_last_error_message());                                 \
        }                                                                     \
    } while (0)

#define KiB (1024u)
#define MiB (1024u * 1024u)

static void fill(uint8_t *buf, size_t len, uint8_t seed) {
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(seed + i * 7);
}

static int all_zero(const uint8_t *buf, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (buf[i])
            return 0;
    return 1;
}

/* A reader thread: reads the snapshot over and over while the main
 * thread writes the live volume; every read must show the snapshot. */
struct reader {
    const vs_volume *vol;
    const uint8_t *id;
    const uint8_t *expected;
    size_t len;
    int bad;
};

static void *read_snapshot_repeatedly(void *arg) {
    struct reader *r = arg;
    uint8_t *buf = malloc(r->len);
    if (!buf) {
        r->bad = 1;
        return NULL;
    }
    for (int i = 0; i < 50; i++) {
        if (vs_snapshot_read(r->vol, r->id, 0, buf, r->len) != VS_OK ||
            memcmp(buf, r->expected, r->len) != 0)
            r->bad++;
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv) {
    char dir[4096];
    if (argc > 1) {
        snprintf(dir, sizeof dir, "%s", argv[1]);
    } else {
        char tmpl[] = "/tmp/volshadow-capi-XXXXXX";
        if (!mkdtemp(tmpl)) {
            perror("mkdtemp");
            return 2;
        }
        snprintf(dir, sizeof dir, "%s", tmpl);
    }
    char img[4200], dif[4200];
    snprintf(img, sizeof img, "%s/disk.img", dir);
    snprintf(dif, sizeof dif, "%s/disk.diff", dir);

    CHECK(strlen(vs_version()) > 0);

    /* Images: a 4 MiB origin and room for 2 MiB of old data. */
    CHECK(vs_image_create(img, 4 * MiB) == VS_OK);
    CHECK(vs_image_create(dif, vs_diff_area_len_for(2 * MiB, 0)) == VS_OK);
    CHECK(vs_image_create(img, 4 * MiB) == VS_ERR_EXISTS);
    CHECK(vs_last_error_code() == VS_ERR_EXISTS);
    CHECK(strstr(vs_last_error_message(), "disk.img") != NULL);

    vs_volume_options opts = vs_volume_options_default();
    opts.policy = 7;
    vs_volume *vol = NULL;
    CHECK(vs_volume_create(img, dif, &opts, &vol) == VS_ERR_INVALID_ARGUMENT);
    CHECK(vol == NULL);
    opts.policy = VS_POLICY_FAIL_WRITES;
    CHECK(vs_volume_create(img, dif, &opts, &vol) == VS_OK);
    CHECK(vol != NULL);
    if (!vol)
        goto done;

    uint64_t size = 0;
    CHECK(vs_volume_size(vol, &size) == VS_OK && size == 4 * MiB);

    /* A written, snapshot s1; B over part of it, snapshot s2; C later. */
    static uint8_t a[64 * KiB], b[16 * KiB], c[4 * KiB], got[64 * KiB];
    fill(a, sizeof a, 1);
    fill(b, sizeof b, 2);
    fill(c, sizeof c, 3);
    vs_snapshot_info s1, s2;
    CHECK(vs_volume_write(vol, 0, a, sizeof a) == VS_OK);
    CHECK(vs_snapshot_create(vol, true, &s1) == VS_OK);
    CHECK(vs_volume_write(vol, 16 * KiB, b, sizeof b) == VS_OK);
    CHECK(vs_snapshot_create(vol, true, &s2) == VS_OK);
    CHECK(vs_volume_write(vol, 1 * MiB, c, sizeof c) == VS_OK);
    CHECK(vs_volume_flush(vol) == VS_OK);
    CHECK(s1.seq == 1 && s2.seq == 2 && s1.persistent && s2.persistent);
    CHECK(memcmp(s1.id, s2.id, VS_ID_LEN) != 0);

    /* Listing: ask the count, then fetch. */
    size_t count = 99;
    CHECK(vs_snapshot_list(vol, NULL, 0, &count) == VS_ERR_BUFFER_TOO_SMALL);
    CHECK(count == 2);
    vs_snapshot_info list[4];
    CHECK(vs_snapshot_list(vol, list, 4, &count) == VS_OK && count == 2);
    CHECK(memcmp(list[0].id, s1.id, VS_ID_LEN) == 0);
    CHECK(memcmp(list[1].id, s2.id, VS_ID_LEN) == 0);
    CHECK(list[1].created_unix_ns >= list[0].created_unix_ns);

    /* Reads: each snapshot shows the volume as it was. */
    CHECK(vs_snapshot_read(vol, s1.id, 0, got, sizeof a) == VS_OK);
    CHECK(memcmp(got, a, sizeof a) == 0);
    CHECK(vs_snapshot_read(vol, s2.id, 16 * KiB, got, sizeof b) == VS_OK);
    CHECK(memcmp(got, b, sizeof b) == 0);
    CHECK(vs_snapshot_read(vol, s2.id, 1 * MiB, got, sizeof c) == VS_OK);
    CHECK(all_zero(got, sizeof c));
    CHECK(vs_volume_read(vol, 1 * MiB, got, sizeof c) == VS_OK);
    CHECK(memcmp(got, c, sizeof c) == 0);

    /* Changed extents: whole 16 KiB chunks. */
    vs_extent ext[8];
    CHECK(vs_changed_extents(vol, s1.id, s2.id, ext, 8, &count) == VS_OK);
    CHECK(count == 1 && ext[0].offset == 16 * KiB && ext[0].length == 16 * KiB);
    CHECK(vs_changed_extents(vol, s2.id, NULL, ext, 8, &count) == VS_OK);
    CHECK(count == 1 && ext[0].offset == 1 * MiB && ext[0].length == 16 * KiB);
    CHECK(vs_changed_extents(vol, s2.id, s1.id, ext, 8, &count) == VS_ERR_INVALID_ARGUMENT);

    /* Errors say what failed and change nothing. */
    CHECK(vs_volume_write(vol, 4 * MiB - 1, c, 2) == VS_ERR_OUT_OF_RANGE);
    CHECK(vs_volume_read(vol, 0, NULL, 10) == VS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(vs_last_error_message(), "buf") != NULL);
    CHECK(vs_volume_write(NULL, 0, c, 1) == VS_ERR_INVALID_ARGUMENT);
    uint8_t nobody[VS_ID_LEN] = {0};
    CHECK(vs_snapshot_read(vol, nobody, 0, got, 1) == VS_ERR_NOT_FOUND);
    CHECK(vs_snapshot_delete(vol, nobody) == VS_ERR_NOT_FOUND);
    CHECK(vs_volume_read(vol, 4 * MiB - 1, got, 1) == VS_OK); /* last byte */

    /* Ids as text, both ways. */
    char text[VS_ID_STRING_LEN];
    uint8_t back[VS_ID_LEN];
    CHECK(vs_id_format(s2.id, text) == VS_OK && strlen(text) == 36);
    CHECK(vs_id_parse(text, back) == VS_OK && memcmp(back, s2.id, VS_ID_LEN) == 0);
    CHECK(vs_id_parse("not-an-id", back) == VS_ERR_INVALID_ARGUMENT);

    vs_verify_report report;
    CHECK(vs_volume_verify(vol, &report) == VS_OK);
    CHECK(report.clean && report.checked == 2 && report.mismatches == 0);

    /* Delete s1, revert to s2: C's chunk reads as it was at s2 (zeros). */
    CHECK(vs_snapshot_delete(vol, s1.id) == VS_OK);
    CHECK(vs_snapshot_list(vol, list, 4, &count) == VS_OK && count == 1);
    CHECK(vs_volume_revert(vol, s2.id) == VS_OK);
    CHECK(vs_volume_read(vol, 1 * MiB, got, sizeof c) == VS_OK && all_zero(got, sizeof c));
    CHECK(vs_volume_read(vol, 16 * KiB, got, sizeof b) == VS_OK);
    CHECK(memcmp(got, b, sizeof b) == 0);

    /* One handle, several threads: readers of s2 while this thread
     * overwrites the live volume. */
    static uint8_t at_s2[64 * KiB], noise[64 * KiB];
    CHECK(vs_snapshot_read(vol, s2.id, 0, at_s2, sizeof at_s2) == VS_OK);
    fill(noise, sizeof noise, 9);
    struct reader readers[4];
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {
        readers[i] = (struct reader){vol, s2.id, at_s2, sizeof at_s2, 0};
        CHECK(pthread_create(&threads[i], NULL, read_snapshot_repeatedly, &readers[i]) == 0);
    }
    for (int i = 0; i < 50; i++)
        CHECK(vs_volume_write(vol, (uint64_t)(i % 4) * 16 * KiB, noise, 16 * KiB) == VS_OK);
    for (int i = 0; i < 4; i++) {
        CHECK(pthread_join(threads[i], NULL) == 0);
        CHECK(readers[i].bad == 0);
    }
    CHECK(vs_volume_revert(vol, s2.id) == VS_OK);

    /* Close, reopen: the persistent snapshot is still there and a second
     * opener is refused while the first holds the files. */
    CHECK(vs_volume_close(vol) == VS_OK);
    vol = NULL;
    CHECK(vs_volume_close(NULL) == VS_OK);
    CHECK(vs_volume_open(img, dif, &vol) == VS_OK && vol != NULL);
    if (!vol)
        goto done;
    vs_volume *second = NULL;
    CHECK(vs_volume_open(img, dif, &second) == VS_ERR_IN_USE && second == NULL);
    CHECK(vs_snapshot_list(vol, list, 4, &count) == VS_OK && count == 1);
    CHECK(memcmp(list[0].id, s2.id, VS_ID_LEN) == 0);
    CHECK(vs_snapshot_read(vol, s2.id, 0, got, sizeof a) == VS_OK);
    CHECK(memcmp(got, a, 16 * KiB) == 0 && memcmp(got + 16 * KiB, b, sizeof b) == 0);
    CHECK(memcmp(got + 32 * KiB, a + 32 * KiB, 32 * KiB) == 0);
    CHECK(vs_volume_close(vol) == VS_OK);

done:
    unlink(img);
    unlink(dif);
    if (argc <= 1)
        rmdir(dir);
    printf("volshadow C ABI: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
