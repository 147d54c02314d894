;; out[j] = sum_d q[d] * k[j * c + d] for j < n, in float64 (a product of two float32s is exact in float64).
;; q: c float64s (the query, widened once by the caller); k: n rows of c float32s; out: n float64s; c % 4 == 0.
;; Arguments are byte offsets into the page's memory. dots.wasm beside it is this, assembled by wasmtime.wat2wasm
;; (tests/test_hover.py checks they agree); vggattn.view.hover.page_props hands it to hover.js.
(module
  (import "env" "memory" (memory 1))
  (func (export "dots") (param $q i32) (param $k i32) (param $n i32) (param $c i32) (param $out i32)
    (local $end i32) (local $row_end i32) (local $qp i32)
    (local $x v128) (local $y v128) (local $a v128) (local $b v128) (local $e v128) (local $f v128)
    (local.set $end (i32.add (local.get $out) (i32.shl (local.get $n) (i32.const 3))))
    (block $rows_done
      (loop $rows
        (br_if $rows_done (i32.ge_u (local.get $out) (local.get $end)))
        (local.set $a (v128.const f64x2 0 0))
        (local.set $b (v128.const f64x2 0 0))
        (local.set $e (v128.const f64x2 0 0))
        (local.set $f (v128.const f64x2 0 0))
        (local.set $qp (local.get $q))
        (local.set $row_end (i32.add (local.get $k) (i32.shl (local.get $c) (i32.const 2))))
        (block $eights_done
          (loop $eights  ;; eight float32s of the key (32 bytes) and eight float64s of the query (64 bytes) a step
            (br_if $eights_done (i32.gt_u (i32.add (local.get $k) (i32.const 32)) (local.get $row_end)))
            (local.set $x (v128.load (local.get $k)))
            (local.set $y (v128.load offset=16 (local.get $k)))
            (local.set $a (f64x2.add (local.get $a)
              (f64x2.mul (f64x2.promote_low_f32x4 (local.get $x)) (v128.load (local.get $qp)))))
            (local.set $b (f64x2.add (local.get $b)
              (f64x2.mul
                (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $x) (local.get $x)))
                (v128.load offset=16 (local.get $qp)))))
            (local.set $e (f64x2.add (local.get $e)
              (f64x2.mul (f64x2.promote_low_f32x4 (local.get $y)) (v128.load offset=32 (local.get $qp)))))
            (local.set $f (f64x2.add (local.get $f)
              (f64x2.mul
                (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $y) (local.get $y)))
                (v128.load offset=48 (local.get $qp)))))
            (local.set $k (i32.add (local.get $k) (i32.const 32)))
            (local.set $qp (i32.add (local.get $qp) (i32.const 64)))
            (br $eights)))
        (if (i32.lt_u (local.get $k) (local.get $row_end))  ;; c % 8 == 4: the last four
          (then
            (local.set $x (v128.load (local.get $k)))
            (local.set $a (f64x2.add (local.get $a)
              (f64x2.mul (f64x2.promote_low_f32x4 (local.get $x)) (v128.load (local.get $qp)))))
            (local.set $b (f64x2.add (local.get $b)
              (f64x2.mul
                (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $x) (local.get $x)))
                (v128.load offset=16 (local.get $qp)))))
            (local.set $k (local.get $row_end))))
        (local.set $a (f64x2.add (f64x2.add (local.get $a) (local.get $b)) (f64x2.add (local.get $e) (local.get $f))))
        (f64.store (local.get $out)
          (f64.add (f64x2.extract_lane 0 (local.get $a)) (f64x2.extract_lane 1 (local.get $a))))
        (local.set $out (i32.add (local.get $out) (i32.const 8)))
        (br $rows)))))
